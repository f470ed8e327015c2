"""What every script shares around its benchmark: progress lines, options, the run itself."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class BenchError(RuntimeError):
    """A benchmark could not run (a daemon did not start, a tool failed)."""


def sayer(prefix: str = "bench", clock: bool = False) -> Callable[[str], None]:
    """A function printing progress lines ``[prefix] ...`` (``[prefix HH:MM:SS]``) to stderr."""
    def say(message: str) -> None:
        stamp = f" {time.strftime('%H:%M:%S')}" if clock else ""
        print(f"[{prefix}{stamp}] {message}", file=sys.stderr, flush=True)
    return say


def output_options(parser: argparse.ArgumentParser, keep: str = "--keep-temp",
                   keep_help: str = "keep the temporary directory (logs, cluster)",
                   json_help: str = "print JSON instead of the table") -> None:
    """``--json``, ``--json-out FILE`` and ``--keep-temp`` (spelt ``keep``)."""
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON to FILE")
    parser.add_argument(keep, action="store_true", help=keep_help)


def run(bench: Any, args: Any, table: Any, errors: tuple[type[BaseException], ...],
        say: Any) -> int:
    """Run ``bench`` (``run()`` then always ``cleanup()``) and print its results.

    SIGTERM and Ctrl-C interrupt it (130) and ``errors`` fail it (1), cleaned up
    either way; the results go to ``args.json_out`` if set, and to standard output
    as JSON (``args.json``) or as ``table(results)``.
    """
    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    try:
        results = bench.run()
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    except errors as e:
        say(f"failed: {e}")
        return 1
    finally:
        bench.cleanup()
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print(table(results))
    return 0


def bench_parser(script: str, doc: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of ``tools/bench/SCRIPT``: its docstring's first line, its targets."""
    return argparse.ArgumentParser(
        prog=f"tools/bench/{script}", description=doc.splitlines()[0], epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)


def daemon_options(parser: argparse.ArgumentParser, what: str, tmpdir: bool = True) -> None:
    """``--logger`` (twistd's), ``--tmpdir`` and ``--py-spy DIR`` of a benchmarked daemon."""
    parser.add_argument("--logger", default="treadmill.common.logging.text",
                        help="twistd --logger, as in the systemd unit ('' for twistd's default)")
    if tmpdir:
        parser.add_argument("--tmpdir", help="where to make the temporary directory (default: "
                                             "the system's; it decides the disk measured)")
    parser.add_argument("--py-spy", metavar="DIR",
                        help=f"sample {what} with py-spy (raw stacks in DIR); it perturbs "
                             "the figures")


def missing(script: str, *tools: str) -> int | None:
    """2 (after saying what to install) if ``tools`` or the .venv's twistd are missing."""
    import shutil

    from benchkit.procs import VENV

    absent = [tool for tool in tools if shutil.which(tool) is None]
    if absent:
        print(f"{script}: missing {', '.join(absent)} (apt-get install {' '.join(absent)}; "
              "tools/setup-env installs some)", file=sys.stderr)
        return 2
    if not (VENV / "twistd").exists():
        print(f"{script}: .venv/bin/twistd not found; run tools/setup-env first",
              file=sys.stderr)
        return 2
    return None


def options(parser: argparse.ArgumentParser,
            table: tuple[tuple[str, Callable[[str], Any], Any, str | None], ...]) -> None:
    """Options from rows ``(flag, type, default, help)``."""
    for flag, kind, default, text in table:
        parser.add_argument(flag, type=kind, default=default, help=text)
