"""Registered image stores and site caches."""

from __future__ import annotations

import psycopg2
import psycopg2.errors

from treadmill.switchboard.store.base import Queries
from treadmill.switchboard.store.errors import Conflict, NotFound


class ImageStoreQueries(Queries):
    """The image stores (and site caches) registered with the switchboard."""

    _STORE_COLUMNS = "url, service, description, cache, created_at"

    async def create_image_store(self, url: str, service: str, description: str,
                                 cache: bool) -> dict:
        """Register an image store (or a site cache); :class:`Conflict` on a taken URL
        or service name."""
        try:
            return await self.pool.fetchone(
                "INSERT INTO image_stores (url, service, description, cache) "
                f"VALUES (%s, %s, %s, %s) RETURNING {self._STORE_COLUMNS}",
                (url, service, description, cache))
        except psycopg2.errors.UniqueViolation:
            raise Conflict(f"an image store with URL {url!r} or service {service!r} "
                           "is already registered") from None

    async def list_image_stores(self) -> list[dict]:
        return await self.pool.fetchall(
            f"SELECT {self._STORE_COLUMNS} FROM image_stores ORDER BY url")

    async def image_store_by_service(self, service: str) -> dict | None:
        return await self.pool.fetchone(
            f"SELECT {self._STORE_COLUMNS} FROM image_stores WHERE service = %s", (service,))

    async def delete_image_store(self, service: str) -> None:
        """Unregister the store of ``service``; catalogue images keep naming its URL, but
        no job start carries it and no token is issued for it any more."""
        row = await self.pool.fetchone(
            "DELETE FROM image_stores WHERE service = %s RETURNING id", (service,))
        if row is None:
            raise NotFound(f"no image store with service name {service!r} is registered")
