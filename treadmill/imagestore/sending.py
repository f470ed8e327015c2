"""Serving blob bytes: a file producer with backpressure (``Range`` is parsed by
:mod:`treadmill.common.ranges`)."""

from __future__ import annotations

from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import Cooperator, TaskFinished, cooperate
from twisted.python.failure import Failure
from zope.interface import implementer

READ_SIZE = 64 * 1024


@implementer(IPushProducer)
class BlobSender:
    """Writes ``length`` bytes of an open file to a consumer (a request).

    It reads :data:`READ_SIZE` bytes per step of a :class:`Cooperator`
    task, which runs steps for at most about 10 ms per reactor turn, and
    registers as a streaming producer so that the transport pauses it while
    its send buffer is full: memory stays flat whatever the blob's size.
    The reads are ordinary blocking reads on the reactor thread, like
    ``twisted.web.static``'s producers (64 KiB each, from the page cache
    or a local disk in practice); a reactor turn is never spent on more
    than one time slice of them.
    """

    def __init__(self, file: IO[bytes], length: int, cooperator: Cooperator | None = None):
        self.file = file
        self.remaining = length
        self.sent = 0
        self._cooperate = cooperator.cooperate if cooperator is not None else cooperate
        self._task: Any = None
        self._done: Deferred[int] = Deferred()

    def start(self, consumer: IConsumer) -> Deferred[int]:
        """Send; fires with the byte count, or fails if the consumer went away."""
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self._task = self._cooperate(self._steps())
        self._task.whenDone().addCallbacks(self._finished, self._failed)
        return self._done

    def _steps(self) -> Any:
        while self.remaining > 0:
            data = self.file.read(min(READ_SIZE, self.remaining))
            if not data:
                raise OSError("blob file is shorter than expected")
            self.remaining -= len(data)
            self.sent += len(data)
            self._consumer.write(data)
            yield None

    def _finished(self, _: Any) -> None:
        self._consumer.unregisterProducer()
        if not self._done.called:
            self._done.callback(self.sent)

    def _failed(self, failure: Failure) -> None:
        try:
            self._consumer.unregisterProducer()
        except Exception:
            pass
        if not self._done.called:
            if failure.check(TaskFinished):
                failure = Failure(ConnectionLost("the client went away"))
            self._done.errback(failure)

    def pauseProducing(self) -> None:
        try:
            self._task.pause()
        except TaskFinished:
            pass

    def resumeProducing(self) -> None:
        try:
            self._task.resume()
        except Exception:  # NotPaused, or finished meanwhile
            pass

    def stopProducing(self) -> None:
        try:
            self._task.stop()
        except TaskFinished:
            pass
