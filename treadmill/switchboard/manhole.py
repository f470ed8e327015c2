"""The switchboard's manhole helpers (``help_manhole()`` lists them in the shell).

They act as an admin would through the API, with the same store calls and
views, so what they show and change is what ``tml`` shows and changes. Those
that change something are made per session (:class:`PerSession`): their audit
records name the session's operator (user name and key fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from treadmill.common.manhole import PerSession
from treadmill.switchboard import views
from treadmill.switchboard.access import Principal
from treadmill.switchboard.audit import Recorder

if TYPE_CHECKING:
    from treadmill.switchboard.service import SwitchboardService

__all__ = ["helpers"]

# The manhole acts as an admin; user id 0 belongs to nobody.
OPERATOR = Principal(user_id=0, name="manhole", admin=True)


def helpers(service: SwitchboardService) -> dict[str, Callable[..., Any]]:
    """The helper functions of ``service``'s manhole namespace."""
    audit = Recorder(service.store)

    def list_links() -> list[dict[str, Any]]:
        """Supervisors connected to this instance: host, protocol minor, peer address."""
        found = []
        for link in service.links.by_host.values():
            peer = link.transport.getPeer() if link.transport is not None else None
            found.append({"host": link.host_name, "minor": link.minor,
                          "peer": f"{peer.host}:{peer.port}" if peer is not None else None})
        return sorted(found, key=lambda link: link["host"])

    async def list_jobs(*states: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest jobs of every user (only those in ``states`` if given): id, state,
        owner, host."""
        rows = await service.store.list_jobs(OPERATOR, states=states, limit=limit)
        return [{"id": str(row["id"]), "state": row["state"], "owner": row["owner"],
                 "host": row["host"]} for row in rows]

    async def list_hosts() -> list[dict[str, Any]]:
        """Every host: name, enabled, healthy, connected, current job."""
        return [{key: views.host(row)[key]
                 for key in ("name", "enabled", "healthy", "connected", "current_job")}
                for row in await service.store.list_hosts(OPERATOR)]

    def changes(operator: str) -> dict[str, Callable[..., Any]]:
        """The helpers that change something, recording ``operator`` (the session's
        user name and key fingerprint) in their audit records."""

        async def drain(host: str) -> dict[str, Any]:
            """Take ``host`` out of scheduling (as ``tml host drain``); its current job
            runs on."""
            async def drain_it(store: Any) -> dict[str, Any]:
                await store.update_host(host, enabled=False)
                return await store.get_host(host, OPERATOR)

            row = await service.store.audited(drain_it, lambda row: audit.entry(
                None, "manhole", "host.drain", "host", row["name"], operator=operator))
            return views.host(row)

        async def revoke_token(token_id: str) -> dict[str, Any]:
            """Revoke the API token with id ``token_id`` (as ``tml token revoke``)."""
            row = await service.store.audited(
                lambda store: store.revoke_token(token_id),
                lambda row: audit.entry(None, "manhole", "token.revoke", "user", row["user"],
                                        subject_user=row["user"], token_id=str(row["id"]),
                                        label=row["label"], operator=operator))
            service.auth.invalidate()  # at once on this instance, as the API does
            return views.token(row)

        return {"drain": drain, "revoke_token": revoke_token}

    return {"list_links": list_links, "list_jobs": list_jobs, "list_hosts": list_hosts,
            **{name: PerSession(lambda operator, name=name: changes(operator)[name])
               for name in ("drain", "revoke_token")}}
