"""Who may do what: capability tokens and the registry token challenge.

Requests carry ``Authorization: Bearer <capability token>`` signed by the
switchboard and verified offline (:class:`treadmill.common.keys.LiveVerifier`).
Access entries use the Docker registry token shape:

======================  ==============  =============================
type                    name            actions
======================  ==============  =============================
``repository``          ``lab/fw``      ``pull``, ``push``, ``delete``
``registry``            ``catalog``     ``*`` (``GET /v2/_catalog``)
``registry``            ``gc``          ``*`` (``POST /admin/gc``, ``/admin/evict``)
``cache``               ``leases``      ``lease`` (``/cache/leases``)
``cache``               ``replicate``   ``*`` (``/cache/replicate``)
======================  ==============  =============================

A refused request gets ``401 UNAUTHORIZED`` with the token flow's challenge::

    WWW-Authenticate: Bearer realm="<auth.realm>",service="<service>",
                      scope="repository:lab/fw:pull,push"[,error="invalid_token"]

so that a registry client (skopeo, docker) asks the realm (the switchboard's
``GET /api/v1/registry/token``) for a token with that scope and retries. A
cross-repository mount's challenge names the source too
(``repository:<name>:pull,push repository:<from>:pull``). An
insufficient token also gets 401 (with ``error="insufficient_scope"``), not
403: registry clients only fetch a new token after a 401.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from treadmill.common.captoken import CapabilityError, Claims, bearer_token
from treadmill.imagestore.errors import OCIError


def glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one path component, ``**`` across components, ``?`` one char."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def anonymous_patterns(value: Any) -> list[str]:
    """The ``anonymous_pull`` setting: a boolean, or glob patterns of repositories."""
    if isinstance(value, bool):
        return ["**"] if value else []
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "on"):
            return ["**"]
        if lowered in ("false", "no", "off", ""):
            return []
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError("expected a boolean or a list of repository patterns")
    for item in value:
        if not re.fullmatch(r"[a-z0-9._/*?-]+", item):
            raise ValueError(f"invalid repository pattern {item!r}")
    return list(value)


def scope(type: str, name: str, actions: Sequence[str]) -> str:
    return f"{type}:{name}:{','.join(actions)}"


class Authorizer:
    """Decides each request from its capability token and the anonymous-pull rules.

    ``verifier`` is a :class:`~treadmill.common.keys.LiveVerifier` (anything
    with ``verify(token, type, name, action)`` and ``verify_any(token)``);
    with ``disabled`` it may be None and everything is allowed.
    """

    log = Logger()

    def __init__(self, verifier: Any, *, realm: str | None, service: str,
                 anonymous_pull: Sequence[str] = (), disabled: bool = False):
        self.verifier = verifier
        self.realm = realm or ""
        self.service = service
        self.disabled = disabled
        self.anonymous = [glob_regex(p) for p in anonymous_pull]
        if disabled:
            self.log.warn("AUTHENTICATION IS DISABLED (auth.disabled = true): anyone who "
                          "reaches this image store may pull, push and delete anything. "
                          "Use this for local experiments only.")

    def anonymous_pull(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self.anonymous)

    def challenge(self, scopes: Sequence[str] = (), error: str | None = None) -> str:
        value = f'Bearer realm="{self.realm}",service="{self.service}"'
        if scopes:
            value += f',scope="{" ".join(scopes)}"'
        if error:
            value += f',error="{error}"'
        return value

    def _refuse(self, message: str, scopes: Sequence[str], error: str | None) -> OCIError:
        return OCIError("UNAUTHORIZED", message,
                        headers={"WWW-Authenticate": self.challenge(scopes, error)})

    def _token(self, request: IRequest, scopes: Sequence[str]) -> str:
        token = bearer_token(request.getHeader("authorization"))
        if token is None:
            raise self._refuse("authentication required", scopes, None)
        return token

    def authenticate(self, request: IRequest) -> Claims | None:
        """Any valid token (``GET /v2/``); None when authentication is disabled."""
        if self.disabled:
            return None
        token = self._token(request, ())
        try:
            return self.verifier.verify_any(token)
        except CapabilityError as e:
            raise self._refuse(f"invalid token: {e.message}", (), "invalid_token") from None

    def require(self, request: IRequest, type: str, name: str, action: str,
                challenge: Sequence[str] | None = None) -> Claims | None:
        """Allow ``action`` on (``type``, ``name``) or raise ``UNAUTHORIZED``.

        ``challenge`` lists the scopes to ask for in ``WWW-Authenticate``
        (default: just this one).
        """
        if self.disabled:
            return None
        if type == "repository" and action == "pull" and self.anonymous_pull(name):
            return None
        scopes = list(challenge) if challenge else [scope(type, name, [action])]
        token = self._token(request, scopes)
        try:
            return self.verifier.verify(token, type, name, action)
        except CapabilityError as e:
            error = "insufficient_scope" if e.reason == "insufficient_scope" else "invalid_token"
            raise self._refuse(f"{e.message}", scopes, error) from None

    def require_one(self, request: IRequest, grants: Sequence[tuple[str, str, str]],
                    ) -> tuple[int, Claims | None]:
        """The index of the first of ``grants`` the request's token allows, and its claims.

        Always needs a token (``anonymous_pull`` does not apply); with
        authentication disabled, ``(0, None)``. The challenge asks for every
        grant's scope.
        """
        if self.disabled:
            return 0, None
        scopes = [scope(t, n, [a]) for t, n, a in grants]
        token = self._token(request, scopes)
        try:
            claims = self.verifier.verify_any(token)
        except CapabilityError as e:
            raise self._refuse(f"invalid token: {e.message}", scopes, "invalid_token") from None
        for i, (t, n, a) in enumerate(grants):
            if claims.allows(t, n, a):
                return i, claims
        wanted = " or ".join(f"{a} on {t} {n}" for t, n, a in grants)
        raise self._refuse(f"token does not grant {wanted}", scopes, "insufficient_scope")

    def allows(self, request: IRequest, type: str, name: str, action: str) -> bool:
        """Like :meth:`require`, as a boolean (for a cross-repository mount's source)."""
        try:
            self.require(request, type, name, action)
        except OCIError:
            return False
        return True
