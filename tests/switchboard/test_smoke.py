import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_whoami(switchboard):
    r = await switchboard.admin.get("/api/v1/whoami")
    assert r.status == 200, r.body
    assert r.body["name"] == "admin" and r.body["admin"] is True
