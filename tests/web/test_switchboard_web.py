"""The console on the switchboard: assets and their headers, cookie sessions, CSRF, log
out, privileges; and CORS on the log server for the console's origin."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
import treq

from tests.support import start_switchboard
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.logserver.service import LogServerConfig, LogServerService
from treadmill.switchboard import credentials
from treadmill.switchboard.auth import csrf_token
from treadmill.switchboard.web import Assets, content_security_policy

PASSWORD = "correct horse battery"


def _cookies(response) -> dict[str, str]:
    return {c.split("=", 1)[0]: c for c in response.headers.getRawHeaders("set-cookie", [])}


async def _login(url: str, user: str = "alice") -> tuple[dict[str, str], str]:
    r = await treq.post(f"{url}/console/session", json={"user": user, "password": PASSWORD},
                        headers={"X-CSRF-Token": "login"})
    body = await r.json()
    assert r.code == 201, body
    cookies = _cookies(r)
    token = cookies["treadmill_session"].split(";")[0].split("=", 1)[1]
    return {"treadmill_session": token, "treadmill_csrf": body["csrf"]}, token


@pytest_twisted.ensureDeferred
async def test_assets_headers_sessions_and_csrf(database: str, tmp_path: Path) -> None:
    sb = await start_switchboard(database, tmp_path)
    try:
        await sb.store.create_user("alice", False, credentials.hash_password_sync(PASSWORD))
        # The page and its assets.
        r = await treq.get(f"{sb.url}/")
        page = await r.text()
        assert r.code == 200 and "<script" in page and 'type="module"' in page
        assert r.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
        policy = r.headers.getRawHeaders("content-security-policy")[0]
        assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
        assert r.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
        etag = r.headers.getRawHeaders("etag")[0]
        r = await treq.get(f"{sb.url}/", headers={"If-None-Match": etag})
        assert r.code == 304
        for path, kind in (("app.js", "text/javascript; charset=utf-8"),
                           ("style.css", "text/css; charset=utf-8"),
                           ("vendor/xterm/xterm.mjs", "text/javascript; charset=utf-8")):
            r = await treq.get(f"{sb.url}/console/assets/{path}")
            await r.content()
            assert r.code == 200 and r.headers.getRawHeaders("content-type") == [kind], path
        r = await treq.get(f"{sb.url}/console/assets/vendor/xterm/xterm.mjs")
        await r.content()
        assert "max-age=86400" in r.headers.getRawHeaders("cache-control")[0]
        for bad in ("../__init__.py", "__init__.py", "nope.js", ".hidden.js"):
            r = await treq.get(f"{sb.url}/console/assets/{bad}")
            await r.content()
            assert r.code == 404, bad
        # The API still answers everywhere else.
        r = await treq.get(f"{sb.url}/healthz")
        assert r.code == 200 and (await r.json())["status"] == "ok"

        # Log in: the token goes into an HttpOnly, SameSite=Strict cookie.
        r = await treq.post(f"{sb.url}/console/session",
                            json={"user": "alice", "password": PASSWORD})
        assert r.code == 403  # no custom header: a cross-site form cannot log anyone in
        await r.content()
        r = await treq.post(f"{sb.url}/console/session", json={"user": "alice", "password": "x"},
                            headers={"X-CSRF-Token": "login"})
        assert r.code == 401
        await r.content()
        cookies, token = await _login(sb.url)
        assert cookies["treadmill_csrf"] == csrf_token(token)
        r = await treq.post(f"{sb.url}/console/session", json={"user": "alice",
                                                               "password": PASSWORD},
                            headers={"X-CSRF-Token": "login"})
        raw = _cookies(r)
        await r.content()
        session = raw["treadmill_session"].lower()
        assert "httponly" in session and "samesite=strict" in session and "secure" not in session
        assert "httponly" not in raw["treadmill_csrf"].lower()

        # Reads with the cookie alone; writes need the CSRF header too.
        r = await treq.get(f"{sb.url}/api/v1/whoami", cookies=cookies)
        assert r.code == 200 and (await r.json())["name"] == "alice"
        body = {"label": "from the console"}
        r = await treq.post(f"{sb.url}/api/v1/tokens", json=body, cookies=cookies)
        assert r.code == 403 and "CSRF" in (await r.json())["error"]["message"]
        r = await treq.post(f"{sb.url}/api/v1/tokens", json=body, cookies=cookies,
                            headers={"X-CSRF-Token": "0" * 64})
        assert r.code == 403
        await r.content()
        r = await treq.post(f"{sb.url}/api/v1/tokens", json=body, cookies=cookies,
                            headers={"X-CSRF-Token": cookies["treadmill_csrf"]})
        assert r.code == 201
        created = await r.json()
        # A bearer client needs no CSRF header, and a cookie does not change that.
        r = await treq.post(f"{sb.url}/api/v1/tokens", json=body,
                            headers={"Authorization": f"Bearer {created['token']}"},
                            cookies={"treadmill_session": "garbage"})
        assert r.code == 201
        await r.content()

        # Privileges for the buttons.
        r = await treq.get(f"{sb.url}/console/privileges/host/nope", cookies=cookies)
        assert r.code == 404
        await r.content()

        # Log out revokes the session's token.
        r = await treq.delete(f"{sb.url}/console/session", cookies=cookies)
        assert r.code == 403  # CSRF
        await r.content()
        r = await treq.delete(f"{sb.url}/console/session", cookies=cookies,
                              headers={"X-CSRF-Token": cookies["treadmill_csrf"]})
        assert r.code == 204
        await r.content()
        r = await treq.get(f"{sb.url}/api/v1/whoami",
                           headers={"Authorization": f"Bearer {token}"})
        assert r.code == 401
        await r.content()
        # Logging out of an ended session only clears the cookies.
        r = await treq.delete(f"{sb.url}/console/session", cookies=cookies,
                              headers={"X-CSRF-Token": cookies["treadmill_csrf"]})
        assert r.code == 204 and "Max-Age=0" in _cookies(r)["treadmill_session"]
        await r.content()
    finally:
        await sb.stop()


def test_policy_and_assets() -> None:
    policy = content_security_policy(["http://127.0.0.1:8070"])
    assert "connect-src 'self' http://127.0.0.1:8070;" in policy
    assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    assets = Assets()
    for name in ("index.html", "app.js", "vendor/xterm/LICENSE", "vendor/xterm/VERSION"):
        assert assets.get(name) is not None, name
    assert assets.get("../switchboard/web.py") is None


@pytest_twisted.ensureDeferred
async def test_log_server_cors_for_configured_origins(tmp_path: Path) -> None:
    from twisted.internet import reactor

    key = tmp_path / "key.pem"
    load_or_create_signing_key(str(key))
    service = LogServerService(reactor, LogServerConfig(
        root=str(tmp_path / "logs"), listen=["tcp:0:interface=127.0.0.1"],
        auth={"auth.keys_file": str(key)}, fsync="never", access_log=False,
        cors_origins=("http://console.test:8080",)))
    service.startService()
    await service.ready()
    url = f"http://127.0.0.1:{service.ports()[0].getHost().port}"
    path = f"{url}/v1/jobs/00000000-0000-0000-0000-000000000001/streams/console"
    try:
        pre = {"Origin": "http://console.test:8080", "Access-Control-Request-Method": "GET",
               "Access-Control-Request-Headers": "authorization"}
        r = await treq.request("OPTIONS", path, headers=pre)
        await r.content()
        assert r.code == 204
        assert r.headers.getRawHeaders("access-control-allow-origin") == [
            "http://console.test:8080"]
        assert "Authorization" in r.headers.getRawHeaders("access-control-allow-headers")[0]
        assert r.headers.getRawHeaders("access-control-allow-credentials") is None
        r = await treq.request("OPTIONS", path, headers={**pre, "Origin": "http://evil.test"})
        await r.content()
        assert r.code == 403 and r.headers.getRawHeaders("access-control-allow-origin") is None
        # An actual read: refused without a token, but readable by the console's page.
        r = await treq.get(path, headers={"Origin": "http://console.test:8080"})
        await r.content()
        assert r.code == 401
        assert r.headers.getRawHeaders("access-control-allow-origin") == [
            "http://console.test:8080"]
        r = await treq.get(path, headers={"Origin": "http://evil.test"})
        await r.content()
        assert r.headers.getRawHeaders("access-control-allow-origin") is None
    finally:
        await service.stopService()


def test_cors_origins_setting() -> None:
    from treadmill.common.cors import origins
    from treadmill.logserver.tap import Options, config_from

    assert origins(["HTTPS://Console.Example:8443/", "http://127.0.0.1:8080"]) == [
        "https://console.example:8443", "http://127.0.0.1:8080"]
    assert origins("https://a.example") == ["https://a.example"]
    for bad in (["ftp://a.example"], ["https://a.example/path"], ["*"], [1], {"a": 1}):
        with pytest.raises(ValueError):
            origins(bad)
    # The example configuration lists none; a file's list reaches the config.
    example = Path(__file__).parents[2] / "etc" / "treadmill" / "logserver.toml"
    options = Options()
    options.parseOptions(["--config", str(example), "--root", "/srv/logs"])
    assert config_from(options.values).cors_origins == ()


def test_cors_origins_from_a_file(tmp_path: Path) -> None:
    from treadmill.logserver.tap import Options, config_from

    config = tmp_path / "logserver.toml"
    config.write_text('root = "/x"\n[auth]\nkeys_file = "/k"\n'
                      '[http]\ncors_origins = ["https://Treadmill.example"]\n')
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert config_from(options.values).cors_origins == ("https://treadmill.example",)
    config.write_text('root = "/x"\n[auth]\nkeys_file = "/k"\n'
                      '[http]\ncors_origins = ["https://treadmill.example/console"]\n')
    with pytest.raises(Exception, match="cors_origins"):
        Options().parseOptions(["--config", str(config)])
