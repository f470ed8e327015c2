"""Snapshots of ended jobs (``/api/v1/jobs/ID/snapshots``)."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, read_json, respond
from treadmill.images.oci import repository_of
from treadmill.switchboard import schemas, views
from treadmill.switchboard.api.args import path_uuid
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.api.images import check_writable
from treadmill.switchboard.api.stores import registered_stores
from treadmill.switchboard.store.errors import Conflict

app = Routes.app


class SnapshotRoutes(Routes):
    """Snapshots asked for and read."""

    @app.route("/api/v1/jobs/<job_id>/snapshots", methods=["POST"])
    async def snapshot_job(self, request: IRequest, job_id: str) -> bytes:
        """Ask the job's host to upload the disk the ended job left as a new image.

        ``manage``, not ``stop``: the image is a copy of everything the job wrote."""
        principal, row = await self._job(request, job_id, "manage")
        body = read_json(request, schemas.SNAPSHOT_CREATE)
        if row["state"] != "terminated":
            raise ApiError(409, f"job {row['id']} has not ended; stop it first")
        if row["host_id"] is None:
            raise ApiError(409, f"job {row['id']} never ran on a host")
        stores = row["image_stores"] or []
        store = body.get("store") or (stores[0] if stores else None)
        if store is None:
            raise ApiError(400, "store: the job's image names no image store; give one")
        store = (await registered_stores(self.store, "store", [store]))[0]
        name = body["name"]
        try:
            repository = repository_of(name)
        except ValueError:
            raise ApiError(400, f"name: {name!r} is not a valid repository name") from None
        await check_writable(self.store, principal, name)
        try:
            snapshot = await self.store.audited(
                lambda s: s.create_snapshot(row["id"], row["host_id"], principal.user_id, name,
                                            repository, store, body.get("description", "")),
                lambda snapshot: self.audit.entry(
                    request, principal, "job.snapshot", "job", row["id"],
                    subject_user=row["owner"], name=name, store=store,
                    snapshot=str(snapshot["id"])))
        except Conflict:
            # As for POST /images: nothing about whose image or snapshot holds it.
            raise ApiError(409, f"image name {name!r} is not available (an image or a "
                                "snapshot under way holds it)") from None
        return respond(request, views.snapshot(snapshot), 202)

    @app.route("/api/v1/jobs/<job_id>/snapshots", methods=["GET"])
    async def job_snapshots(self, request: IRequest, job_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        rows = await self.store.job_snapshots(row["id"])
        return respond(request, {"snapshots": [views.snapshot(r) for r in rows]})

    @app.route("/api/v1/jobs/<job_id>/snapshots/<snapshot_id>", methods=["GET"])
    async def show_snapshot(self, request: IRequest, job_id: str, snapshot_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        snapshot = await self.store.get_snapshot(row["id"], path_uuid(snapshot_id, "snapshot"))
        return respond(request, views.snapshot(snapshot))
