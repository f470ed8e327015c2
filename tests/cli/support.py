"""Helpers of the ``tml`` tests: every leaf command of a parser (``commands``), a
switchboard with an image store for ``tml image`` (``store_env``, ``register``), a
``DIGEST``."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

DIGEST = "sha256:" + "0123456789abcdef" * 4
"""An image digest for requests that need one."""

STORE = "http://store.example"
"""The image store ``store_env`` registers."""


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf command of the tree with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from commands(child, (*path, name))


async def store_env(switchboard: Any, tmp_path: Path) -> dict[str, str]:
    """``tml``'s environment as ``switchboard``'s admin, with :data:`STORE` registered."""
    env = switchboard.tml_env(tmp_path)
    await switchboard.register_store(STORE, "store")
    return env


async def register(tml: Callable[..., Awaitable[Any]], env: dict[str, str], name: str,
                   digest: str, *args: str) -> Any:
    """``tml image register NAME DIGEST --store STORE ARGS...``: its result."""
    return await tml("image", "register", name, digest, "--store", STORE, *args, env=env)
