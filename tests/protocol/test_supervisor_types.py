"""The typed supervisor messages (``JobStart``, ``JobEvent``) name the keys of the
protocol's JSON Schema, and require those it requires."""

from __future__ import annotations

import pytest

from treadmill.protocol import supervisor as protocol


def _definition(name: str) -> dict:
    return protocol.schema()["$defs"][name]


@pytest.mark.parametrize(("typed", "name"), [
    (protocol.JobStart, "JobStart"), (protocol.JobEvent, "JobEvent")])
def test_typed_dicts_follow_the_schema(typed, name):
    definition = _definition(name)
    assert set(typed.__required_keys__ | typed.__optional_keys__) \
        == set(definition["properties"])
    assert set(typed.__required_keys__) == set(definition["required"])


def test_job_start_parts_follow_the_schema():
    properties = _definition("JobStart")["properties"]
    image = properties["image"]
    assert set(protocol.JobImage.__required_keys__) == set(image["required"]) \
        == set(image["properties"])
    parameter = properties["parameters"]["additionalProperties"]
    assert set(protocol.JobParameter.__required_keys__) == set(parameter["required"])
    urls = _definition("ServiceURLs")
    for field in ("log_servers", "proxies"):
        assert properties[field]["$ref"] == "#/$defs/ServiceURLs"
        assert _definition("RenewTokens")["properties"][field] == {"$ref": "#/$defs/ServiceURLs"}
    assert set(protocol.ServiceURL.__required_keys__) == set(urls["items"]["required"]) \
        == set(urls["items"]["properties"])


def test_job_event_constructor_is_valid():
    protocol.validate(protocol.job_event(3, "6f2d3c9a-0e1b-4c8d-9a7f-5b4e3d2c1a0f", "terminated",
                                         reason="workload_exited", exit_status=0))
