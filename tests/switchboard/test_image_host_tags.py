"""Catalogue images' default host tags: a job naming the image without tags gets them."""

from __future__ import annotations

import pytest_twisted

from tests.support import RunningSwitchboard

DIGEST = "sha256:" + "f" * 64
STORE = "http://store.example"


@pytest_twisted.ensureDeferred
async def test_a_job_without_tags_takes_the_images_host_tags(
        switchboard: RunningSwitchboard) -> None:
    await switchboard.register_store(STORE, "store")
    admin = switchboard.admin
    r = await admin.post("/api/v1/images", {"name": "vm", "digest": DIGEST, "stores": [STORE],
                                            "host_tags": ["qemu", "arch=x86_64"]})
    assert r.status == 201 and r.body["host_tags"] == ["qemu", "arch=x86_64"]
    job = (await admin.post("/api/v1/jobs", {"image": "vm"})).body
    assert job["tags"] == ["qemu", "arch=x86_64"]
    job = (await admin.post("/api/v1/jobs", {"image": "vm", "tags": ["mock"]})).body
    assert job["tags"] == ["mock"]  # the job's own tags win
    job = (await admin.post("/api/v1/jobs", {"image": "vm", "tags": []})).body
    assert job["tags"] == []  # even none, when asked for explicitly
    job = (await admin.post("/api/v1/jobs", {"image": DIGEST})).body
    assert job["tags"] == []  # a bare digest names no catalogue entry
    r = await admin.put("/api/v1/images/vm", {"host_tags": ["board"]})
    assert r.body["host_tags"] == ["board"]
    r = await admin.put("/api/v1/images/vm", {"description": "kept tags"})
    assert r.body["host_tags"] == ["board"]
    r = await admin.post("/api/v1/images", {"name": "bad", "digest": DIGEST, "stores": [STORE],
                                            "host_tags": ["no spaces allowed"]})
    assert r.status == 400
