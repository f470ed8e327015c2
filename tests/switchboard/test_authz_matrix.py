"""The authorisation matrix: every endpoint by every kind of caller.

Callers: anonymous (no token), another user, the owner of the resource, a
grantee (read on the host and the job, use on the image), and an admin. Each
row names the expected status for each caller; resources are created afresh
for every caller so that one caller's writes cannot change another's answer.
A resource a caller may not see at all answers 404, not 403, so that its
existence does not leak.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted

from tests.support import Client, RunningSwitchboard
from tests.util.ssh import new_ssh_public_key
from treadmill.common import sshkeys
from treadmill.switchboard import credentials
from treadmill.switchboard.jobstate import Reason, State, Status

ROLES = ("anonymous", "other", "owner", "grantee", "admin")
DIGEST = "sha256:" + "ab" * 32
PASSWORD = "the owner's password"

_counter = itertools.count()


@dataclass
class World:
    """Fresh resources owned by ``owner``, with grants to ``grantee``."""

    host: str
    spare_host: str
    image: str
    job: str
    done_job: str
    token_of_owner: str
    fresh: str
    store_service: str
    owner: str = "owner"
    grantee: str = "grantee"
    use: str = "use"
    key_of_owner: str = ""
    hosts: str = "hosts"  # the kinds of /api/v1/health-checks/{kind}/{name}
    tags: str = "tags"
    job_kind: str = "job"  # the kinds of /console/privileges/{kind}/{ident}
    host_kind: str = "host"
    image_kind: str = "image"
    asset: str = "index.html"  # /console/assets/{path}


async def build_world(sb: RunningSwitchboard, clients: dict[str, Client]) -> World:
    n = next(_counter)
    store = sb.store
    owner_id = await store.user_id("owner")
    grantee_id = await store.user_id("grantee")
    host, spare, image = f"host-{n}", f"spare-{n}", f"image-{n}"
    if not await store.list_image_stores():
        await sb.register_store("http://store.example", "s")
        await sb.register_store("https://s.example", "s2")
        await sb.register_store("http://s.example", "s3")
    await sb.register_store(f"https://store-{n}.example", f"store-{n}")
    await store.create_host(host, ["a"], owner_id, "", credentials.token_hash(f"x{n}"))
    await store.create_host(spare, [], owner_id, "", credentials.token_hash(f"y{n}"))
    await store.create_image(image, DIGEST, ["http://store.example"], owner_id, "")
    r = await clients["owner"].post("/api/v1/jobs", {"image": image})
    assert r.status == 201, r.body
    job = r.body["id"]
    admin = await store.get_user("admin")
    from treadmill.switchboard.access import Principal

    principal = Principal(admin["id"], "admin", True)
    host_id = (await store.get_host(host, principal))["id"]
    image_id = (await store.get_image(image, principal))["id"]
    await store.add_grant("host", host_id, grantee_id, "read")
    await store.add_grant("image", image_id, grantee_id, "use")
    await store.add_grant("job", job, grantee_id, "read")
    r = await clients["owner"].post("/api/v1/jobs", {"image": image})
    done_job = r.body["id"]
    await store.transition(done_job, Status(State.TERMINATED, reason=Reason.USER_TERMINATED))
    await store.add_grant("job", done_job, grantee_id, "read")
    spare_token = await store.create_token(owner_id, credentials.token_hash(f"z{n}"), "", 60)
    key = sshkeys.parse(new_ssh_public_key())
    owner_key = await store.add_ssh_key(owner_id, key.type, key.body, "", key.fingerprint, 99)
    return World(key_of_owner=str(owner_key["id"]),  # 0013_ssh_keys
                 host=host, spare_host=spare, image=image, job=job, done_job=done_job,
                 token_of_owner=spare_token["id"], fresh=f"new-{n}",
                 store_service=f"store-{n}")


@dataclass
class Row:
    method: str
    path: str  # formatted with the World's fields
    expect: tuple[int, int, int, int, int]  # anonymous, other, owner, grantee, admin
    body: Callable[[World], Any] | None = None

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"


def _none(w: World) -> Any:
    return None


ROWS = [
    Row("GET", "/api/v1/whoami", (401, 200, 200, 200, 200)),
    Row("GET", "/api/v1/tokens", (401, 200, 200, 200, 200)),
    Row("GET", "/api/v1/tokens?user=owner", (401, 403, 200, 403, 200)),
    Row("POST", "/api/v1/tokens", (401, 201, 201, 201, 201), lambda w: {"label": "x"}),
    Row("POST", "/api/v1/tokens", (401, 403, 201, 403, 201), lambda w: {"user": "owner"}),
    Row("DELETE", "/api/v1/tokens/{token_of_owner}", (401, 404, 200, 404, 200)),
    Row("GET", "/api/v1/keys", (401, 200, 200, 200, 200)),
    Row("GET", "/api/v1/keys?user=owner", (401, 403, 200, 403, 200)),
    Row("POST", "/api/v1/keys", (401, 201, 201, 201, 201), lambda w: {"key": new_ssh_public_key()}),
    Row("POST", "/api/v1/keys?user=owner", (401, 403, 201, 403, 201),
        lambda w: {"key": new_ssh_public_key()}),
    Row("DELETE", "/api/v1/keys/{key_of_owner}", (401, 404, 200, 404, 200)),
    Row("GET", "/api/v1/users", (401, 403, 403, 403, 200)),
    Row("POST", "/api/v1/users", (401, 403, 403, 403, 201), lambda w: {"name": w.fresh}),
    Row("POST", "/api/v1/login", (201, 201, 201, 201, 201),
        lambda w: {"user": "owner", "password": PASSWORD}),
    Row("POST", "/api/v1/login", (401, 401, 401, 401, 401),
        lambda w: {"user": "owner", "password": "not the password"}),
    Row("GET", "/api/v1/users/{owner}", (401, 403, 200, 403, 200)),
    Row("PATCH", "/api/v1/users/{owner}", (401, 403, 403, 403, 200), lambda w: {"admin": False}),
    Row("PATCH", "/api/v1/users/{owner}", (401, 403, 200, 403, 200),
        lambda w: {"password": "long enough password"}),
    Row("GET", "/api/v1/hosts", (401, 200, 200, 200, 200)),
    Row("POST", "/api/v1/hosts", (401, 403, 403, 403, 201), lambda w: {"name": w.fresh}),
    Row("GET", "/api/v1/hosts/{host}", (401, 404, 200, 200, 200)),
    Row("PUT", "/api/v1/hosts/{host}/tags", (401, 404, 200, 403, 200),
        lambda w: {"tags": ["b"]}),
    Row("POST", "/api/v1/hosts/{host}/drain", (401, 404, 200, 403, 200)),
    Row("POST", "/api/v1/hosts/{host}/enable", (401, 404, 200, 403, 200)),
    Row("POST", "/api/v1/hosts/{host}/token", (401, 403, 403, 403, 200)),
    Row("DELETE", "/api/v1/hosts/{spare_host}", (401, 403, 403, 403, 204)),
    Row("GET", "/api/v1/hosts/{host}/grants", (401, 404, 200, 403, 200)),
    Row("POST", "/api/v1/hosts/{host}/grants", (401, 404, 201, 403, 201),
        lambda w: {"user": "other", "privilege": "start"}),
    Row("DELETE", "/api/v1/hosts/{host}/grants/grantee/read", (401, 404, 204, 403, 204)),
    Row("GET", "/api/v1/hosts/{host}/health", (401, 404, 200, 200, 200)),
    Row("GET", "/api/v1/health-checks", (401, 403, 403, 403, 200)),
    Row("PUT", "/api/v1/health-checks/{hosts}/{host}", (401, 403, 403, 403, 200),
        lambda w: {"image": DIGEST, "expect_exit": 0}),
    Row("PUT", "/api/v1/health-checks/{tags}/{fresh}", (401, 403, 403, 403, 200),
        lambda w: {"image": DIGEST, "every_jobs": 5}),
    Row("DELETE", "/api/v1/health-checks/{hosts}/{host}", (401, 403, 403, 403, 404)),
    Row("GET", "/api/v1/images", (401, 200, 200, 200, 200)),
    # Top-level names are the admins'; a namespace is its user's (security issue 12).
    Row("POST", "/api/v1/images", (401, 403, 403, 403, 201),
        lambda w: {"name": w.fresh, "digest": DIGEST, "stores": ["https://s.example"]}),
    Row("POST", "/api/v1/images", (401, 403, 201, 403, 201),
        lambda w: {"name": f"owner/{w.fresh}", "digest": DIGEST,
                   "stores": ["https://s.example"]}),
    Row("GET", "/api/v1/images/{image}", (401, 404, 200, 200, 200)),
    Row("PUT", "/api/v1/images/{image}", (401, 404, 200, 403, 200),
        lambda w: {"description": "changed"}),
    Row("DELETE", "/api/v1/images/{image}", (401, 404, 204, 403, 204)),
    Row("GET", "/api/v1/images/{image}/history", (401, 404, 200, 200, 200)),
    Row("POST", "/api/v1/images/{image}/rollback", (401, 404, 200, 403, 200),
        lambda w: {"version": 1}),
    Row("GET", "/api/v1/images/{image}/grants", (401, 404, 200, 403, 200)),
    Row("POST", "/api/v1/images/{image}/grants", (401, 404, 201, 403, 201),
        lambda w: {"user": "*", "privilege": "use"}),
    Row("DELETE", "/api/v1/images/{image}/grants/grantee/use", (401, 404, 204, 403, 204)),
    Row("GET", "/api/v1/stores", (401, 200, 200, 200, 200)),
    Row("POST", "/api/v1/stores", (401, 403, 403, 403, 201),
        lambda w: {"url": f"https://{w.fresh}.example", "service": w.fresh}),
    Row("DELETE", "/api/v1/stores/{store_service}", (401, 403, 403, 403, 204)),
    Row("GET", "/api/v1/jobs", (401, 200, 200, 200, 200)),
    Row("GET", "/api/v1/jobs?id_prefix={job}&restart_of={job}", (401, 200, 200, 200, 200)),
    Row("POST", "/api/v1/jobs", (401, 201, 201, 201, 201), lambda w: {"image": DIGEST}),
    Row("POST", "/api/v1/jobs", (401, 400, 201, 201, 201), lambda w: {"image": w.image}),
    Row("GET", "/api/v1/jobs/{job}", (401, 404, 200, 200, 200)),
    Row("POST", "/api/v1/jobs/{job}/terminate", (401, 404, 200, 403, 200)),
    Row("POST", "/api/v1/jobs/{job}/extend", (401, 404, 200, 403, 200), lambda w: {"by": 60}),
    Row("POST", "/api/v1/jobs/{done_job}/extend", (401, 404, 409, 403, 409),
        lambda w: {"by": 60}),
    Row("GET", "/api/v1/jobs/{job}/events", (401, 404, 200, 200, 200)),
    Row("POST", "/api/v1/jobs/{job}/logs/token", (401, 404, 200, 200, 200)),
    # Consoles: read watches (read on the job), manage types (the default; manage).
    Row("POST", "/api/v1/jobs/{job}/console-token", (401, 404, 200, 200, 200),
        lambda w: {"access": "read"}),
    Row("POST", "/api/v1/jobs/{job}/console-token", (401, 404, 200, 403, 200),
        lambda w: {"access": "manage"}),
    Row("POST", "/api/v1/jobs/{job}/console-token", (401, 404, 200, 403, 200)),
    # The job never ran on a host: 409 once authorised (manage privilege needed).
    Row("POST", "/api/v1/jobs/{done_job}/snapshots", (401, 404, 409, 403, 409),
        lambda w: {"name": f"owner/{w.fresh}", "store": "http://s.example"}),
    Row("GET", "/api/v1/jobs/{done_job}/snapshots", (401, 404, 200, 200, 200)),
    Row("GET", "/api/v1/jobs/{done_job}/snapshots/{job}",  # no such snapshot
        (401, 404, 404, 404, 404)),
    Row("GET", "/api/v1/jobs/{done_job}/events/watch", (401, 404, 200, 200, 200)),
    Row("GET", "/api/v1/jobs/{job}/grants", (401, 404, 200, 403, 200)),
    Row("POST", "/api/v1/jobs/{job}/grants", (401, 404, 201, 403, 201),
        lambda w: {"user": "other", "privilege": "stop"}),
    Row("DELETE", "/api/v1/jobs/{job}/grants/grantee/read", (401, 404, 204, 403, 204)),
    Row("GET", "/api/v1/namespaces/{owner}/grants", (401, 403, 403, 403, 200)),
    Row("POST", "/api/v1/namespaces/{fresh}/grants", (401, 403, 403, 403, 201),
        lambda w: {"user": "grantee", "privilege": "manage"}),
    Row("DELETE", "/api/v1/namespaces/{owner}/grants/{grantee}/{use}",  # no such grant
        (401, 403, 403, 403, 404)),
    # Everyone reads the audit log, each only what they may (tests/switchboard/test_audit.py).
    Row("GET", "/api/v1/audit", (401, 200, 200, 200, 200)),
    Row("GET", "/api/v1/audit?user=owner&job={job}", (401, 200, 200, 200, 200)),
    Row("GET", "/healthz", (200, 200, 200, 200, 200)),
    Row("GET", "/api/v1/openapi.json", (200, 200, 200, 200, 200)),
    Row("GET", "/api/v1/registry/token?service=s&scope=repository:owner/x:pull",
        (200, 200, 200, 200, 200)),
    Row("GET", "/.well-known/treadmill/capability-keys", (200, 200, 200, 200, 200)),
    # The web console (switchboard/web.py): what a page may show, read like the object.
    Row("GET", "/console/privileges/{job_kind}/{job}", (401, 404, 200, 200, 200)),
    Row("GET", "/console/privileges/{host_kind}/{host}", (401, 404, 200, 200, 200)),
    Row("GET", "/console/privileges/{image_kind}/{image}", (401, 404, 404, 404, 404)),
    Row("GET", "/", (200, 200, 200, 200, 200)),
    Row("GET", "/console/assets/{asset}", (200, 200, 200, 200, 200)),
    # Log in needs the CSRF header (no login CSRF); log out ends only a cookie session.
    Row("POST", "/console/session", (403, 403, 403, 403, 403),
        lambda w: {"user": "owner", "password": PASSWORD}),
    Row("DELETE", "/console/session", (204, 400, 400, 400, 400)),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id + f" #{i}" for i, row in enumerate(ROWS)])
@pytest_twisted.ensureDeferred
async def test_authorisation(switchboard: RunningSwitchboard, row: Row) -> None:
    clients = {
        "anonymous": Client(switchboard.url, None),
        "admin": switchboard.admin,
        "other": await switchboard.user("other"),
        "owner": await switchboard.user("owner"),
        "grantee": await switchboard.user("grantee"),
    }
    if row.path == "/api/v1/login":
        await switchboard.store.update_user(
            "owner", password_hash=credentials.hash_password_sync(PASSWORD))
    got = {}
    for role in ROLES:
        world = await build_world(switchboard, clients)
        path = row.path.format(**vars(world))
        body = (row.body or _none)(world)
        response = await clients[role].request(row.method, path, body)
        got[role] = response.status
        if response.status >= 400:
            assert response.error is not None, (role, response.body)
    assert got == dict(zip(ROLES, row.expect, strict=True))


@pytest_twisted.ensureDeferred
async def test_every_route_is_in_the_matrix() -> None:
    """A new route must get a row here."""
    from treadmill.switchboard.api import SwitchboardAPI
    from treadmill.switchboard.web import WebConsole

    covered = set()
    for row in ROWS:
        path = row.path.split("?")[0]
        covered.add((row.method, path))
    routes = set()
    rules = [*SwitchboardAPI.app.url_map.iter_rules(), *WebConsole.app.url_map.iter_rules()]
    for rule in rules:
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((method, rule.rule))
    # Map each route to a covered concrete path by shape.
    import re

    def shape(path: str) -> str:
        return re.sub(r"\{[^}]+\}|<[^>]+>", "*", path)

    covered_shapes = {(m, shape(p)) for m, p in covered}
    generic = {"/api/v1/*/*/grants", "/api/v1/*/*/grants/*/*", "/api/v1/images/*",
               # Host tokens, not API tokens: tests/switchboard/test_links.py.
               "/api/v1/supervisor"}
    missing = set()
    for method, rule in routes:
        s = shape(rule)
        if s in generic:
            continue
        if (method, s) not in covered_shapes:
            missing.add((method, rule))
    assert not missing, f"routes without a row in the matrix: {sorted(missing)}"
