"""Create the first admin of a switchboard database and print an API token.

    python -m treadmill.switchboard.bootstrap --config /etc/treadmill/switchboard.toml \\
        --admin alice [--label bootstrap] [--expires-in SECONDS]

Applies migrations first (so it works on an empty database), makes ``alice``
an admin (creating the user if needed, enabling her if disabled) and prints a
new token for her on standard output. Run it as an operator with access to the
database; every later change goes through the API (``tml admin …``). Its changes
are in the audit log like the API's, by actor ``bootstrap`` (kind ``system``)
with the operating-system user who ran it as ``details.operator``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from treadmill.switchboard import credentials
from treadmill.switchboard.audit import Entry
from treadmill.switchboard.database import Pool, migrate
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.errors import NotFound
from treadmill.switchboard.tap import database_arguments, parsed_dsn

#: The audit log's actor of this command's changes (``actor_kind`` ``system``).
ACTOR = "bootstrap"


def operator() -> str:
    """The operating-system user running this command (a uid without a name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _entry(action: str, user: str, **details: Any) -> Entry:
    return Entry(actor=ACTOR, actor_kind="system", action=action, subject_kind="user",
                 subject_id=user, subject_user=user,
                 details={**details, "operator": operator()})


async def bootstrap(reactor: Any, dsn: str, admin: str, label: str,
                    ttl: float | None) -> str:
    """Ensure ``admin`` exists as an enabled admin; return a new token for them. Each
    change is recorded in the audit log (a new user right after its creation, as the
    API does; the others in their change's transaction)."""
    pool = Pool(reactor, dsn, size=1)
    await pool.start()
    try:
        await migrate(pool)
        store = Store(pool)
        try:
            await store.get_user(admin)
            row = await store.audited(
                lambda store: store.update_user(admin, admin=True, disabled=False),
                lambda row: _entry("user.update", row["name"], admin=True, disabled=False))
        except NotFound:
            row = await store.create_user(admin, True, None)
            await store.audit_append(_entry("user.create", row["name"], admin=True,
                                            password=False))
        token = credentials.new_token(credentials.USER_TOKEN_PREFIX)
        await store.audited(
            lambda store: store.create_token(row["id"], credentials.token_hash(token), label,
                                             ttl),
            lambda new: _entry("token.create", new["user"], token_id=str(new["id"]),
                               label=label, expires_at=new["expires_at"]))
        return token
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m treadmill.switchboard.bootstrap",
                                     description=__doc__.splitlines()[0])
    database_arguments(parser)
    parser.add_argument("--admin", required=True, help="user name of the admin")
    parser.add_argument("--label", default="bootstrap", help="label of the new token")
    parser.add_argument("--expires-in", type=float, default=None,
                        help="token lifetime in seconds (default: never expires)")
    args = parser.parse_args(argv)
    dsn = parsed_dsn(parser, args, "bootstrap")

    def run(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            token = await bootstrap(reactor, dsn, args.admin,
                                    args.label, args.expires_in)
            sys.stdout.write(token + "\n")

        return Deferred.fromCoroutine(go())

    react(run)


if __name__ == "__main__":
    main()
