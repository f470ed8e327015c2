"""List or apply the switchboard's pending database migrations.

    treadmill-switchboard-migrate --config /etc/treadmill/switchboard.toml --dry-run
    treadmill-switchboard-migrate --config /etc/treadmill/switchboard.toml

(also ``python -m treadmill.switchboard.migrate``). ``--dry-run`` prints the
migrations the installed version would apply, one per line, and changes
nothing; without it they are applied in one transaction (the same one a
switchboard runs at start, under the same lock) and printed. Either exits 0;
``--check`` with ``--dry-run`` exits 1 when something is pending. Migrations
only add: run them before a rolling restart so that new instances start at
once and old ones keep working (docs/install.md, "Upgrading").
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from treadmill.switchboard.database import Pool, migrate, pending_migrations
from treadmill.switchboard.tap import database_arguments, parsed_dsn

__all__ = ["main", "run_migrations"]


async def run_migrations(reactor: Any, dsn: str, dry_run: bool) -> list[str]:
    """The names of the pending migrations; applied unless ``dry_run``."""
    pool = Pool(reactor, dsn, size=1)
    await pool.start()
    try:
        if dry_run:
            return await pending_migrations(pool)
        return await migrate(pool)
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> None:
    """The command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="treadmill-switchboard-migrate",
                                     description=__doc__.splitlines()[0])
    database_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the pending migrations, apply nothing")
    parser.add_argument("--check", action="store_true",
                        help="with --dry-run: exit 1 if any migration is pending")
    args = parser.parse_args(argv)
    if args.check and not args.dry_run:
        parser.error("--check needs --dry-run")
    dsn = parsed_dsn(parser, args, "migrate")

    def run(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            names = await run_migrations(reactor, dsn, args.dry_run)
            verb = "pending" if args.dry_run else "applied"
            for name in names:
                sys.stdout.write(f"{verb} {name}\n")
            if not names:
                sys.stdout.write("nothing pending\n" if args.dry_run else "nothing to apply\n")
            if args.check and names:
                raise SystemExit(1)

        return Deferred.fromCoroutine(go())

    react(run)  # exits 1 (with the traceback) on a failure, 0 otherwise


if __name__ == "__main__":
    main()
