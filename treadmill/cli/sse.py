"""An incremental Server-Sent Events parser (the WHATWG ``text/event-stream`` format).

Bytes go in as they arrive, in chunks split anywhere (inside a UTF-8 sequence,
between ``\\r`` and ``\\n``); whole messages come out.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

_EOL = re.compile(r"\r\n|\r|\n")
MAX_LINE = 1 << 20


class SSEError(Exception):
    """The stream is not a valid event stream."""


@dataclass(frozen=True)
class SSEMessage:
    """One dispatched message: its event type, data (lines joined by ``\\n``) and last id."""

    event: str
    data: str
    id: str | None = None


class SSEParser:
    """Feed bytes with :meth:`feed`, call :meth:`close` at the end of the stream."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer = ""
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._line_complete = True

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Parse a chunk; return the messages it completed."""
        return self._parse(self._decoder.decode(chunk), final=False)

    def close(self) -> list[SSEMessage]:
        """End of stream: return a last message whose lines were complete.

        The standard drops a message not followed by a blank line; this parser
        keeps it, since a server may close right after its last ``data:`` line.
        """
        messages = self._parse(self._decoder.decode(b"", final=True), final=True)
        if self._data and self._line_complete:
            messages.append(self._dispatch())
        self._data = []
        return messages

    def _parse(self, text: str, *, final: bool) -> list[SSEMessage]:
        text = self._buffer + text
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        messages: list[SSEMessage] = []
        pos = 0
        for m in _EOL.finditer(text):
            if m.group() == "\r" and m.end() == len(text) and not final:
                break  # may be the first half of "\r\n"
            message = self._line(text[pos : m.start()])
            pos = m.end()
            if message is not None:
                messages.append(message)
        self._buffer = text[pos:]
        self._line_complete = not self._buffer
        if len(self._buffer) > MAX_LINE:
            raise SSEError(f"event stream line longer than {MAX_LINE} characters")
        return messages

    def _line(self, line: str) -> SSEMessage | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._last_id = value
        return None

    def _dispatch(self) -> SSEMessage:
        message = SSEMessage(self._event or "message", "\n".join(self._data), self._last_id)
        self._data = []
        self._event = ""
        return message


def json_objects(message: SSEMessage) -> list[dict[str, Any]]:
    """The JSON objects in a message: its whole data, or else one per data line."""
    try:
        value = json.loads(message.data)
    except ValueError:
        try:
            values = [json.loads(line) for line in message.data.split("\n") if line.strip()]
        except ValueError:
            raise SSEError(f"invalid JSON in the event stream: {message.data!r}") from None
    else:
        values = [value]
    for v in values:
        if not isinstance(v, dict):
            raise SSEError(f"expected a JSON object in the event stream, got {message.data!r}")
    return values
