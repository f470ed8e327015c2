"""The agent channel: parsing, dispatch, line limits, console framing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.testing import StringTransport

from treadmill.protocol import agent


class Handler(agent.AgentHandler):
    def __init__(self) -> None:
        self.job_id = "job-1"
        self.job_parameters = {"exit_status": "3", "n": 4}
        self.calls: list[tuple[str, Any]] = []

    def agent_ready(self) -> None:
        self.calls.append(("ready", None))

    def agent_exit(self, status: int, message: str) -> None:
        self.calls.append(("exit", (status, message)))

    def agent_service(self, name: str, port: int) -> None:
        self.calls.append(("service", (name, port)))

    def agent_invalid(self, problem: str) -> None:
        self.calls.append(("invalid", problem))


def channel() -> tuple[agent.AgentProtocol, Handler, StringTransport]:
    handler = Handler()
    proto = agent.AgentProtocol(handler)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, handler, transport


def replies(transport: StringTransport) -> list[dict[str, Any]]:
    return [json.loads(line) for line in transport.value().splitlines()]


def test_messages_are_dispatched_and_answered() -> None:
    proto, handler, transport = channel()
    proto.dataReceived(b'{"type":"hello","agent":"sh"}\n{"type":"get_param')
    proto.dataReceived(b'eters"}\r\n\n{"type":"service","name":"ssh","port":22}\n'
                       b'{"type":"ready"}\n{"type":"exit","status":3,"message":"done"}\n')
    assert handler.calls == [("service", ("ssh", 22)), ("ready", None),
                             ("exit", (3, "done"))]
    assert replies(transport) == [
        {"type": "welcome", "job": "job-1", "protocol": 1},
        {"type": "parameters", "job": "job-1", "parameters": {"exit_status": "3", "n": "4"}}]


@pytest.mark.parametrize("line", [
    b"not json", b"[1]", b'{"type":"launch"}', b'{"type":"exit"}',
    b'{"type":"exit","status":256}', b'{"type":"ready","extra":1}',
    b'{"type":"service","name":"Bad Name","port":22}',
    b'{"type":"service","name":"ssh","port":0}', b'{"type":"exit","status":NaN}',
])
def test_invalid_lines_are_answered_with_an_error_and_change_nothing(line: bytes) -> None:
    proto, handler, transport = channel()
    proto.dataReceived(line + b"\n" + b'{"type":"ready"}\n')
    assert [kind for kind, _ in handler.calls] == ["invalid", "ready"]
    [error] = replies(transport)
    assert error["type"] == "error" and error["message"]


def test_an_overlong_line_is_refused_once_and_the_channel_recovers() -> None:
    proto, handler, transport = channel()
    for _ in range(5):
        proto.dataReceived(b"x" * (agent.MAX_LINE // 2))
    proto.dataReceived(b'tail"}\n{"type":"ready"}\n')
    assert [kind for kind, _ in handler.calls] == ["invalid", "ready"]
    assert len(replies(transport)) == 1


def test_console_framing_passes_every_byte_on_and_finds_agent_lines() -> None:
    handler = Handler()
    console: list[bytes] = []
    sent: list[bytes] = []
    filt = agent.ConsoleAgentFilter(handler, console.append, sent.append)
    stream = (b"U-Boot 2024\r\nbooting...\r\n@@treadmill {\"type\":\"ready\"}\r\n"
              b"app output @@treadmill {\"type\":\"get_parameters\"}\n"
              b"@@treadmill {\"type\":\"exit\",\"status\":0}\n@@treadmill nonsense\n")
    for i in range(0, len(stream), 7):
        filt.feed(stream[i:i + 7])
    assert b"".join(console) == stream
    assert [kind for kind, _ in handler.calls] == ["ready", "exit", "invalid"]
    assert sent[0].startswith(agent.CONSOLE_PREFIX) and sent[0].endswith(b"\n")
    assert json.loads(sent[0][len(agent.CONSOLE_PREFIX):])["type"] == "parameters"
    assert json.loads(sent[1][len(agent.CONSOLE_PREFIX):])["type"] == "error"


class KeysHandler(Handler):
    def __init__(self) -> None:
        super().__init__()
        self.job_ssh_keys = ["ssh-ed25519 AAAAC3Nza alice"]

    def agent_ssh_host_key(self, key: str) -> None:
        self.calls.append(("host_key", key))


def test_ssh_keys_are_handed_out_and_host_keys_reported() -> None:
    handler = KeysHandler()
    proto = agent.AgentProtocol(handler)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b'{"type":"get_ssh_keys"}\n'
                       b'{"type":"ssh_host_key","key":"ssh-ed25519 AAAA"}\n'
                       b'{"type":"ssh_host_key"}\n{"type":"get_ssh_keys","x":1}\n'
                       b'{"type":"ssh_host_key","key":"' + b"A" * 9000 + b'"}\n')
    assert handler.calls[0] == ("host_key", "ssh-ed25519 AAAA")
    assert [kind for kind, _ in handler.calls[1:]] == ["invalid"] * 3
    answers = replies(transport)
    assert answers[0] == {"type": "ssh_keys", "job": "job-1",
                          "keys": ["ssh-ed25519 AAAAC3Nza alice"]}
    assert [a["type"] for a in answers[1:]] == ["error"] * 3
    # A handler without keys (an older driver) answers an empty list.
    proto, _, transport = channel()
    proto.dataReceived(b'{"type":"get_ssh_keys"}\n')
    assert replies(transport) == [{"type": "ssh_keys", "job": "job-1", "keys": []}]
