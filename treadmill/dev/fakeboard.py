"""A simulated serial board on a pseudo-terminal, and its flash and control tools.

Used by the serial driver's tests and by ``tools/devstack --serial-sim``.
``python fakeboard.py run DIR`` is the board: a process that owns the master
side of a pty whose slave side it links as ``DIR/tty`` (the ``serial.device``
of the supervisor under test). It plays a microcontroller board:

- on power-up and after every reset it prints ``FakeBoard 1.0 booting`` and
  ``FakeBoard ok`` (or ``PANIC: board fault`` when broken), then runs the app
  in its flash (``DIR/flash``) or says ``no application``;
- the app is a small script, one instruction per line: ``print TEXT``,
  ``agent JSON`` (an ``@@treadmill`` agent line), ``sleep SECONDS``, ``read``
  (wait for a console input line, print ``got: LINE``), ``params`` (ask the
  supervisor for the job's parameters and print ``param NAME=VALUE``),
  ``exit N [MESSAGE]`` (the agent's exit marker), ``hang`` (stop responding
  until reset), ``spam N`` (N numbered lines at once);
- it obeys commands written to the FIFO ``DIR/control`` (``fakeboard.py ctl``):
  ``reset``, ``off``, ``on``, ``unplug`` (close the pty and remove
  ``DIR/tty``), ``plug`` (a new pty, linked again, then boot), ``break`` and
  ``fix`` (make later boots fail or succeed);
- it appends what happens (``boot``, ``reset``, ``input LINE``, …) to
  ``DIR/events.log``.

The tools: ``flash DIR FILE`` copies FILE into the flash (fails with exit
status 3 and an error when FILE starts with ``FAIL``, 2 when the board's
device is absent), ``erase DIR`` empties it, ``health DIR`` exits 1 while the
board is broken, ``ctl DIR COMMAND`` sends a command to the running board.
Everything is stdlib, so the driver can spawn it with any Python.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import sys
import time
import tty
from pathlib import Path

BANNER = b"FakeBoard 1.0 booting\r\n"
HEALTHY = b"FakeBoard ok\r\n"
PREFIX = b"@@treadmill "


class Board:
    def __init__(self, root: Path):
        self.root = root
        self.master: int | None = None
        self.slave: int | None = None
        self.powered = True
        self.program: list[str] = []
        self.pc = 0
        self.wake_at: float | None = None
        self.waiting: str | None = None  # "read", "params" or "hang"
        self.inbuf = b""
        self.control = os.open(root / "control", os.O_RDONLY | os.O_NONBLOCK)
        # Keep a writer open so that the FIFO never reports end-of-file.
        self._keep = os.open(root / "control", os.O_WRONLY | os.O_NONBLOCK)
        self.ctlbuf = b""

    # -- the device --------------------------------------------------------------------

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.master, self.slave = master, slave
        link = self.root / "tty"
        tmp = self.root / "tty.new"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, link)
        self.event("plugged")

    def unplug(self) -> None:
        link = self.root / "tty"
        if link.is_symlink():
            link.unlink()
        for fd in (self.master, self.slave):
            if fd is not None:
                os.close(fd)
        self.master = self.slave = None
        self.event("unplugged")

    def event(self, text: str) -> None:
        with open(self.root / "events.log", "a") as f:
            f.write(text + "\n")

    def write(self, data: bytes) -> None:
        if self.master is None or not self.powered:
            return
        try:
            os.write(self.master, data)
        except OSError as e:  # nobody reads (a full buffer): a UART drops it too
            if e.errno not in (errno.EAGAIN, errno.EIO):
                raise

    def line(self, text: str | bytes) -> None:
        self.write((text.encode() if isinstance(text, str) else text) + b"\r\n")

    # -- the firmware --------------------------------------------------------------------

    def boot(self) -> None:
        self.program, self.pc, self.wake_at, self.waiting = [], 0, None, None
        self.inbuf = b""
        if not self.powered:
            return
        self.event("boot")
        self.write(BANNER)
        if (self.root / "broken").exists():
            self.line("PANIC: board fault")
            self.waiting = "hang"
            return
        self.write(HEALTHY)
        try:
            app = (self.root / "flash").read_bytes()
        except FileNotFoundError:
            app = b""
        if not app.strip():
            self.line("no application")
            return
        self.line(f"starting app ({len(app)} bytes)")
        self.program = app.decode("utf-8", "surrogateescape").splitlines()
        self.step()

    def step(self) -> None:
        """Run instructions until one waits."""
        while self.waiting is None and self.wake_at is None and self.pc < len(self.program):
            op, _, arg = self.program[self.pc].strip().partition(" ")
            self.pc += 1
            if op == "print":  # its bytes as they are, invalid UTF-8 included
                self.line(arg.encode("utf-8", "surrogateescape"))
            elif op == "agent":
                self.line(PREFIX + arg.encode("utf-8", "surrogateescape"))
            elif op == "sleep":
                self.wake_at = time.monotonic() + float(arg)
            elif op == "read":
                self.waiting = "read"
            elif op == "params":
                self.line(PREFIX + b'{"type":"get_parameters"}')
                self.waiting = "params"
            elif op == "exit":
                status, _, message = arg.partition(" ")
                body = {"type": "exit", "status": int(status)}
                if message:
                    body["message"] = message
                self.line(PREFIX + json.dumps(body).encode())
            elif op == "hang":
                self.event("hung")
                self.waiting = "hang"
            elif op == "spam":
                for i in range(int(arg)):
                    self.line(f"spam {i:06d} " + "x" * 40)

    def tick(self) -> None:
        if self.wake_at is not None and time.monotonic() >= self.wake_at:
            self.wake_at = None
            self.step()

    def input(self, data: bytes) -> None:
        if not self.powered:
            return
        self.inbuf += data
        while True:
            cut = min((i for i in (self.inbuf.find(b"\n"), self.inbuf.find(b"\r")) if i >= 0),
                      default=-1)
            if cut < 0:
                return
            line, self.inbuf = self.inbuf[:cut], self.inbuf[cut + 1:]
            if line:
                self.got(line)

    def got(self, line: bytes) -> None:
        self.event("input " + line.decode("utf-8", "replace"))
        if self.waiting == "read" and not line.startswith(PREFIX):
            self.line(b"got: " + line)
        elif self.waiting == "params" and line.startswith(PREFIX):
            message = json.loads(line[len(PREFIX):])
            if message.get("type") != "parameters":
                return
            for name, value in sorted(message["parameters"].items()):
                self.line(f"param {name}={value}")
        else:
            return
        self.waiting = None
        self.step()

    # -- control -------------------------------------------------------------------------

    def command(self, text: str) -> None:
        self.event("command " + text)
        if text == "reset":
            self.boot()
        elif text == "off":
            self.powered = False
            self.program, self.waiting, self.wake_at = [], None, None
        elif text == "on":
            if not self.powered:
                self.powered = True
                self.boot()
        elif text == "unplug":
            self.unplug()
        elif text == "plug":
            if self.master is None:
                self.plug()
                self.boot()
        elif text == "break":
            (self.root / "broken").touch()
        elif text == "fix":
            (self.root / "broken").unlink(missing_ok=True)

    def serve(self) -> None:
        self.plug()
        self.boot()
        (self.root / "pid").write_text(str(os.getpid()))
        while True:
            timeout = None
            if self.wake_at is not None:
                timeout = max(0.0, self.wake_at - time.monotonic())
            fds = [self.control] + ([self.master] if self.master is not None else [])
            readable, _, _ = select.select(fds, [], [], timeout)
            if self.control in readable:
                self.ctlbuf += os.read(self.control, 4096)
                while b"\n" in self.ctlbuf:
                    line, _, self.ctlbuf = self.ctlbuf.partition(b"\n")
                    self.command(line.decode().strip())
            if self.master is not None and self.master in readable:
                try:
                    data = os.read(self.master, 4096)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EIO):
                        raise
                    data = b""
                self.input(data)
            self.tick()


def main(argv: list[str]) -> int:
    what, root = argv[0], Path(argv[1])
    if what == "run":
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "control").exists():
            os.mkfifo(root / "control")
        Board(root).serve()
    elif what == "flash":
        source = Path(argv[2])
        data = source.read_bytes()
        print(f"fakeflash: writing {len(data)} bytes from {source.name}", flush=True)
        if not (root / "tty").exists():
            print("fakeflash: error: no board on the serial port", file=sys.stderr)
            return 2
        if data.startswith(b"FAIL"):
            print("fakeflash: error: verify failed at 0x00000000", file=sys.stderr)
            return 3
        shutil.copyfile(source, root / "flash.tmp")
        os.replace(root / "flash.tmp", root / "flash")
        with open(root / "events.log", "a") as f:
            f.write(f"flashed {source.name} {len(data)}\n")
        print("fakeflash: done", flush=True)
    elif what == "erase":
        (root / "flash").write_bytes(b"")
        with open(root / "events.log", "a") as f:
            f.write("erased\n")
        print("fakeflash: erased", flush=True)
    elif what == "health":
        if (root / "broken").exists():
            print("fakehealth: the board does not answer", flush=True)
            return 1
        print("fakehealth: ok", flush=True)
    elif what == "ctl":
        try:
            fd = os.open(root / "control", os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            print(f"fakectl: the board is not running: {e}", file=sys.stderr)
            return 1
        os.write(fd, (" ".join(argv[2:]) + "\n").encode())
        os.close(fd)
    else:
        print(f"unknown command {what}", file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
