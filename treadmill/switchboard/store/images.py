"""The images catalogue: names, digests, stores, versions and which repositories they lend."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg2
import psycopg2.errors
from psycopg2.extras import Json

from treadmill.switchboard.access import Principal
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import MY_GRANTS, OWNED_OR_GRANTED, Queries
from treadmill.switchboard.store.errors import Conflict, NotFound

_IMAGE_COLUMNS = """
    i.id, i.name, i.digest, i.stores, i.owner_id, o.name AS owner, i.description,
    i.host_tags, i.kind, i.created_at, i.updated_at, i.results"""


# Whether catalogue image i (owner o) lends its repository to those who may use
# it. Not when the repository lies in another user's namespace that the owner
# may not write: such a name was registered before namespaces were owned
# (security issue 12) and must not open that user's repository.
_LENDS = """(coalesce(o.admin, false)
    OR NOT EXISTS (SELECT 1 FROM users n WHERE lower(n.name) = split_part(lower(i.name), '/', 1)
                   AND n.id IS DISTINCT FROM i.owner_id)
    OR EXISTS (SELECT 1 FROM grants g WHERE g.namespace = split_part(lower(i.name), '/', 1)
               AND g.privilege = 'manage' AND (g.user_id = i.owner_id OR g.user_id IS NULL)))"""


# Catalogue image i is visible to the principal %(uid)s (not an admin).
_VISIBLE = OWNED_OR_GRANTED.format(alias="i", column="image_id")

async def record_version(cur: Cursor, image_id: int, by: int | None, note: str,
                          keep: int | None) -> None:
    """Record the image's current digest, stores, host tags and kind as its next version;
    keep only the last ``keep`` versions (None: all)."""
    await cur.execute(
        "INSERT INTO image_versions (image_id, version, digest, stores, host_tags, kind, "
        "created_by, note) SELECT i.id, coalesce((SELECT max(v.version) FROM image_versions v "
        "WHERE v.image_id = i.id), 0) + 1, i.digest, i.stores, i.host_tags, i.kind, %s, %s "
        "FROM images i WHERE i.id = %s", (by, note, image_id))
    if keep is not None:
        await cur.execute(
            "DELETE FROM image_versions WHERE image_id = %(id)s AND version <= "
            "(SELECT max(version) FROM image_versions WHERE image_id = %(id)s) - %(keep)s",
            {"id": image_id, "keep": keep})


class ImageQueries(Queries):
    """Catalogue images and their kept versions."""

    def _image_query(self, where: str) -> str:
        return (f"SELECT {_IMAGE_COLUMNS}, {MY_GRANTS.format(column='image_id', alias='i')} "
                f"FROM images i LEFT JOIN users o ON o.id = i.owner_id WHERE {where}")

    async def create_image(self, name: str, digest: str, stores: list[str], owner_id: int,
                           description: str, host_tags: Sequence[str] = (),
                           results: dict[str, str] | None = None,
                           kind: str | None = None) -> None:
        async def create(cur: Cursor) -> None:
            row = await cur.fetchone(
                "INSERT INTO images (name, digest, stores, owner_id, description, host_tags, "
                "results, kind) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (name, digest, stores, owner_id, description, list(host_tags),
                 Json(results) if results else None, kind))
            await record_version(cur, row["id"], owner_id, "created", None)

        try:
            await self.pool.transaction(create)
        except psycopg2.errors.UniqueViolation:
            raise Conflict(await self._taken("images", "image", name)) from None

    async def get_image(self, name: str, principal: Principal) -> dict:
        row = await self.pool.fetchone(self._image_query("lower(i.name) = lower(%(name)s)"),
                                       {"name": name, "uid": principal.user_id})
        if row is None:
            raise NotFound(f"no image {name!r}")
        return row

    async def list_images(self, principal: Principal) -> list[dict]:
        where = "true" if principal.admin else _VISIBLE
        return await self.pool.fetchall(self._image_query(where) + " ORDER BY i.name",
                                        {"uid": principal.user_id})

    async def readable_repositories(self, principal: Principal) -> list[str]:
        """Repositories of the catalogue images ``principal`` may use that lend them
        (see ``_LENDS``): what the image gives pull on."""
        rows = await self.pool.fetchall(
            "SELECT DISTINCT lower(i.name) AS repository FROM images i "
            f"LEFT JOIN users o ON o.id = i.owner_id WHERE {_VISIBLE} AND {_LENDS}",
            {"uid": principal.user_id})
        return [row["repository"] for row in rows]

    async def image_lends(self, name: str) -> bool:
        """Whether catalogue image ``name`` may lend its repository (``_LENDS``)."""
        row = await self.pool.fetchone(
            f"SELECT {_LENDS} AS lends FROM images i LEFT JOIN users o ON o.id = i.owner_id "
            "WHERE lower(i.name) = lower(%(name)s)", {"name": name})
        return bool(row and row["lends"])

    async def images_by_digest(self, digest: str, principal: Principal) -> list[dict]:
        return await self.pool.fetchall(
            self._image_query("i.digest = %(digest)s") + " ORDER BY i.name",
            {"digest": digest, "uid": principal.user_id})

    async def update_image(self, name: str, *, digest: str | None, stores: list[str] | None,
                           description: str | None,
                           host_tags: Sequence[str] | None = None,
                           results: dict[str, str] | bool | None = False,
                           kind: str | None = None, by: int | None = None,
                           keep: int = 50) -> None:
        """Change an image; a new digest is recorded as a new version (the last ``keep``
        versions are kept), by user ``by``. ``results``: new console patterns, None to
        clear them, False to keep them."""
        async def update(cur: Cursor) -> None:
            old = await cur.fetchone("SELECT id, digest FROM images "
                                     "WHERE lower(name) = lower(%s) FOR UPDATE", (name,))
            if old is None:
                raise NotFound(f"no image {name!r}")
            await cur.execute(
                "UPDATE images SET digest = coalesce(%s, digest), stores = coalesce(%s, stores), "
                "description = coalesce(%s, description), "
                "host_tags = coalesce(%s, host_tags), kind = coalesce(%s, kind), "
                "results = CASE WHEN %s THEN %s::jsonb ELSE results END, "
                "updated_at = now() WHERE id = %s",
                (digest, stores, description,
                 list(host_tags) if host_tags is not None else None, kind,
                 results is not False, Json(results) if results else None, old["id"]))
            if digest is not None and digest != old["digest"]:
                await record_version(cur, old["id"], by, "replaced", keep)

        await self.pool.transaction(update)

    async def rollback_image(self, name: str, version: int, by: int | None,
                             keep: int = 50) -> None:
        """Make ``version`` of the image current again (digest, stores, host tags, kind),
        recorded as a new version; :class:`NotFound` if it is not (or no longer) kept."""
        async def rollback(cur: Cursor) -> None:
            image = await cur.fetchone("SELECT id FROM images WHERE lower(name) = lower(%s) "
                                       "FOR UPDATE", (name,))
            if image is None:
                raise NotFound(f"no image {name!r}")
            row = await cur.fetchone(
                "UPDATE images i SET digest = v.digest, stores = v.stores, "
                "host_tags = v.host_tags, kind = v.kind, updated_at = now() "
                "FROM image_versions v WHERE i.id = %s AND v.image_id = i.id "
                "AND v.version = %s RETURNING i.id", (image["id"], version))
            if row is None:
                raise NotFound(f"image {name!r} has no version {version} (see its history)")
            await record_version(cur, image["id"], by, f"rollback to version {version}", keep)

        await self.pool.transaction(rollback)

    async def image_history(self, image_id: int) -> list[dict]:
        """The image's kept versions, newest first."""
        return await self.pool.fetchall(
            "SELECT v.version, v.digest, v.stores, v.host_tags, v.kind, u.name AS by, "
            "v.created_at, v.note FROM image_versions v LEFT JOIN users u "
            "ON u.id = v.created_by WHERE v.image_id = %s ORDER BY v.version DESC",
            (image_id,))

    async def delete_image(self, name: str) -> None:
        row = await self.pool.fetchone(
            "DELETE FROM images WHERE lower(name) = lower(%s) RETURNING id", (name,))
        if row is None:
            raise NotFound(f"no image {name!r}")

    async def namespace_images(self, namespace: str, limit: int = 5) -> list[str]:
        """Names of catalogue images whose repository is in ``namespace``, but for those
        of the user of that name."""
        rows = await self.pool.fetchall(
            "SELECT i.name FROM images i LEFT JOIN users o ON o.id = i.owner_id "
            "WHERE split_part(lower(i.name), '/', 1) = lower(%(ns)s) "
            "AND lower(o.name) IS DISTINCT FROM lower(%(ns)s) ORDER BY i.name LIMIT %(n)s",
            {"ns": namespace, "n": limit})
        return [row["name"] for row in rows]
