"""The store on an ``ssl:`` listener: streaming and backpressure work through TLS too."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent

from tests.imagestore.support import build_oci_layout, digest_of, slow_disk, start_store
from tests.util.certs import make_pki
from treadmill.common.tls import client_policy
from treadmill.imagestore.uploads import HIGH_WATER


@pytest_twisted.ensureDeferred
async def test_upload_and_download_over_tls(tmp_path: Path, monkeypatch) -> None:
    pki = make_pki(tmp_path, "store")
    store = await start_store(
        tmp_path / "store", None,
        listen=[f"ssl:0:interface=127.0.0.1:privateKey={pki['key']}:certKey={pki['cert']}"])
    try:
        # A disk far slower than TLS on loopback, even on a loaded machine: the queue fills.
        seen = slow_disk(store, monkeypatch, delay=0.2)
        client = HTTPClient(Agent(reactor, contextFactory=client_policy(str(pki["ca"]))))
        url = f"https://localhost:{store.port}"
        data = os.urandom(16 * 1024 * 1024)
        digest = digest_of(data)
        response = await client.post(f"{url}/v2/lab/fw/blobs/uploads/?digest={digest}",
                                      data=data)
        assert response.code == 201, await response.content()
        assert seen.pauses >= 1 and seen.peak <= HIGH_WATER + 256 * 1024
        response = await client.get(f"{url}/v2/lab/fw/blobs/{digest}")
        assert await response.content() == data

        skopeo = shutil.which("skopeo")
        if skopeo is None:
            pytest.skip("skopeo is not installed")
        certs = tmp_path / "certs"
        certs.mkdir()
        shutil.copy(pki["ca"], certs / "ca.crt")
        source = tmp_path / "source"
        source.mkdir()
        build_oci_layout(source, "v1")
        out, err, code = await getProcessOutputAndValue(
            skopeo, ["--insecure-policy", "copy", "--dest-cert-dir", str(certs),
                     f"oci:{source}:v1", f"docker://localhost:{store.port}/lab/tls:v1"],
            env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")})
        assert code == 0, (out + err).decode()
        assert store.storage.tags("lab/tls") == ["v1"]
    finally:
        await store.stop()
