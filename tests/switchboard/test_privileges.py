"""Any privilege on a host or job lets its holder read it, as the lists show it to them
(a user granted ``start`` on a host saw it in ``GET /api/v1/hosts`` but got 403 on the
host itself and its health)."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.support import RunningSwitchboard
from treadmill.switchboard.access import PRIVILEGES, Principal, effective

BOB = Principal(2, "bob", False)


@pytest.mark.parametrize("kind, granted, held", [
    ("host", [], set()),
    ("host", ["start"], {"read", "start"}),
    ("host", ["read"], {"read"}),
    ("host", ["manage"], {"read", "start", "manage"}),
    ("host", ["stop"], set()),  # a job's privilege means nothing on a host
    ("job", ["stop"], {"read", "stop"}),
    ("image", ["use"], {"use"}),
    ("image", ["read"], set()),
])
def test_any_privilege_implies_the_weakest(kind, granted, held) -> None:
    assert effective(kind, BOB, 1, granted) == held
    assert effective(kind, Principal(1, "owner", False), 1, granted) == set(PRIVILEGES[kind])


@pytest_twisted.ensureDeferred
async def test_what_a_list_shows_its_item_answers(switchboard: RunningSwitchboard) -> None:
    admin = switchboard.admin
    bob = await switchboard.user("bob")
    carol = await switchboard.user("carol")
    assert (await admin.post("/api/v1/hosts", {"name": "lab-1", "tags": ["x"]})).status == 201
    r = await admin.post("/api/v1/hosts/lab-1/grants", {"user": "bob", "privilege": "start"})
    assert r.status == 201, r.body
    job = (await admin.post("/api/v1/jobs", {"image": "sha256:" + "ab" * 32,
                                             "tags": ["nowhere"]})).body["id"]
    r = await admin.post(f"/api/v1/jobs/{job}/grants", {"user": "bob", "privilege": "stop"})
    assert r.status == 201, r.body
    listed = {h["name"] for h in (await bob.get("/api/v1/hosts")).body["hosts"]}
    assert "lab-1" in listed
    assert job in {j["id"] for j in (await bob.get("/api/v1/jobs")).body["jobs"]}
    for path in ("/api/v1/hosts/lab-1", "/api/v1/hosts/lab-1/health", f"/api/v1/jobs/{job}",
                 f"/api/v1/jobs/{job}/events"):
        assert (await bob.get(path)).status == 200, path
        assert (await carol.get(path)).status == 404, path  # nothing held: no such thing
    # Reading does not widen what the grant allows.
    assert (await bob.post("/api/v1/hosts/lab-1/drain")).status == 403
    assert (await bob.get(f"/api/v1/jobs/{job}/grants")).status == 403
