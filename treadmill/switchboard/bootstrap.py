"""Create the first admin of a switchboard database and print an API token.

    python -m treadmill.switchboard.bootstrap --config /etc/treadmill/switchboard.toml \\
        --admin alice [--label bootstrap] [--expires-in SECONDS]

Applies migrations first (so it works on an empty database), makes ``alice``
an admin (creating the user if needed) and prints a new token for her on
standard output. Run it as an operator with access to the database; every
later change goes through the API (``tml admin …``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from treadmill.switchboard import credentials
from treadmill.switchboard.database import Pool, migrate
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.errors import NotFound
from treadmill.switchboard.tap import database_arguments, parsed_dsn


async def bootstrap(reactor: Any, dsn: str, admin: str, label: str,
                    ttl: float | None) -> str:
    """Ensure ``admin`` exists as an admin; return a new token for them."""
    pool = Pool(reactor, dsn, size=1)
    await pool.start()
    try:
        await migrate(pool)
        store = Store(pool)
        try:
            await store.get_user(admin)
            row = await store.update_user(admin, admin=True, disabled=False)
        except NotFound:
            row = await store.create_user(admin, True, None)
        token = credentials.new_token(credentials.USER_TOKEN_PREFIX)
        await store.create_token(row["id"], credentials.token_hash(token), label, ttl)
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
