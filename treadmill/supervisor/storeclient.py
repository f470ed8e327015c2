"""The image fetcher's OCI client: it contacts registered image stores only.

With ``registered`` (the fetcher's ``registered_stores``, the list the
switchboard keeps), a :class:`StoreClient` looks its store's registered service
up before it asks for a token, so a client made before any fetch (e.g. to push
a snapshot) asks for the right audience, and it refuses a store that is not
registered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from treadmill.images.oci import RegistryClient, RegistryError, canonical_store_url

__all__ = ["StoreClient"]


class StoreClient(RegistryClient):
    """A :class:`RegistryClient` towards registered stores only (see the module docstring)."""

    registered: Callable[[], Awaitable[Mapping[str, str] | None]] | None = None

    async def _authenticate(self, repo: str, params: dict[str, str], url: str,
                            actions: Sequence[str] = ("pull",)) -> None:
        if self.registered is not None:
            registered = await self.registered() or {}
            service = registered.get(canonical_store_url(self.base_url))
            if service is None:
                raise RegistryError(
                    401, "UNAUTHORIZED", f"image store {self.base_url} is not registered "
                    "with the switchboard; no token was requested", url)
            self.service = service
        await super()._authenticate(repo, params, url, actions)
