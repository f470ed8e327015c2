"""The PostgreSQL role and database of docs/install.md (section 3), made by its own SQL.

The test cluster admits its owner only (peer authentication as ``postgres``), so the
DSN logs in as that and becomes the role at once (``options=-c role=…``): every
statement is then checked against the role's privileges, and what it creates is the
role's.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from treadmill.dev.pgcluster import drop_database

INSTALL_MD = Path(__file__).resolve().parents[2] / "docs" / "install.md"
_HEREDOC = "sudo -u postgres psql <<'SQL'\n"


def install_md_sql() -> str:
    """The SQL of install.md section 3, as an operator pastes it."""
    text = INSTALL_MD.read_text()
    start = text.index(_HEREDOC) + len(_HEREDOC)
    return text[start:text.index("\nSQL\n", start)]


@contextmanager
def least_privileged_database(pg_admin_dsn: str) -> Iterator[str]:
    """install.md's role and database (named ``treadmill_<random>`` instead of
    ``treadmill``); a DSN acting as the role. Both are dropped afterwards."""
    name = f"treadmill_{uuid.uuid4().hex[:12]}"
    statements = re.sub(r"\btreadmill\b", name, install_md_sql())
    assert "NOSUPERUSER" in statements and "NOCREATEDB" in statements
    conn = psycopg2.connect(pg_admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in filter(None, (s.strip() for s in statements.split(";"))):
                cur.execute(statement)
        yield make_dsn(pg_admin_dsn, dbname=name, options=f"-c role={name}")
    finally:
        drop_database(pg_admin_dsn, name)
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.close()
