"""How switchboard rows look in API responses (see ``docs/api.md``)."""

from __future__ import annotations

from typing import Any


def user(row: dict[str, Any]) -> dict[str, Any]:
    return {"name": row["name"], "admin": row["admin"], "disabled": row["disabled"],
            "created_at": row["created_at"]}


def token(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in
            ("id", "user", "label", "created_at", "expires_at", "last_used_at", "revoked_at")}


def ssh_key(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "user": row["user"], "type": row["key_type"],
            "key": f"{row['key_type']} {row['body']}", "comment": row["comment"],
            "fingerprint": row["fingerprint"], "created_at": row["created_at"]}


def host(row: dict[str, Any]) -> dict[str, Any]:
    """A host; ``instance`` (the switchboard instance holding its link) for admins only:
    the store reads it only for them."""
    shown = {key: row[key] for key in
             ("name", "tags", "owner", "description", "enabled", "healthy",
              "consecutive_failures", "connected", "last_seen_at", "current_job", "created_at",
              "kinds")}
    shown["held_by"], shown["held_until"] = row.get("held_by"), row.get("held_until")
    if "instance" in row:
        shown["instance"] = row["instance"]
    return shown


def health_check(row: dict[str, Any]) -> dict[str, Any]:
    """A health check as set (secret parameter values never shown)."""
    return {"scope": row["scope"], "target": row["target"],
            "image": {"name": row["image"], "digest": row["image_digest"]},
            "parameters": parameters(row["parameters"]),
            **{key: row[key] for key in ("expect_exit", "timeout", "every_jobs", "every_hours",
                                         "after_failures", "set_by", "set_at")}}


def host_health(name: str, found: dict[str, Any]) -> dict[str, Any]:
    """A host's health: the check that applies and its history, newest first."""
    return {"host": name,
            **{key: found[key] for key in ("healthy", "enabled", "consecutive_failures",
                                           "jobs_since_check", "last_check_at")},
            "check": health_check(found["check"]) if found["check"] else None,
            "events": [{key: e[key] for key in ("at", "event", "job", "reason", "healthy",
                                                "actor", "message")}
                       for e in found["events"]]}


def image(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in
            ("name", "digest", "stores", "owner", "description", "host_tags", "kind",
             "created_at", "updated_at", "results")}


def image_version(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in
            ("version", "digest", "stores", "host_tags", "kind", "by", "created_at", "note")}


def image_store(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in ("url", "service", "description", "cache", "created_at")}


def snapshot(row: dict[str, Any]) -> dict[str, Any]:
    error = ({"code": row["error_code"], "message": row["message"] or ""}
             if row["error_code"] else None)
    return {"id": str(row["id"]), "job": str(row["job_id"]), "name": row["name"],
            "repository": row["repository"], "store": row["store"], "owner": row["owner"],
            "description": row["description"], "state": row["state"],
            "digest": row["digest"], "error": error, "created_at": row["created_at"],
            "finished_at": row["finished_at"]}


def grant(row: dict[str, Any]) -> dict[str, Any]:
    return {"user": row["user"], "privilege": row["privilege"], "created_at": row["created_at"]}


def parameters(stored: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Parameters as users read them: secret values are never returned."""
    return {name: ({"secret": True} if p.get("secret") else {"value": p["value"], "secret": False})
            for name, p in stored.items()}


def job(row: dict[str, Any]) -> dict[str, Any]:
    termination = None
    if row["state"] in ("terminating", "terminated"):
        termination = {"reason": row["termination_reason"], "exit_status": row["exit_status"],
                       "message": row["termination_message"]}
    return {
        "id": row["id"], "owner": row["owner"], "label": row["label"],
        "image": {"name": row["image_name"], "digest": row["image_digest"],
                  "stores": row["image_stores"], "kind": row["image_kind"]},
        "tags": row["tags"], "parameters": parameters(row["parameters"]),
        "timeout": row["timeout"], "queue_timeout": row["queue_timeout"],
        "max_restarts": row["max_restarts"], "restart_of": row["restart_of"],
        "restarts_left": row["restarts_left"], "state": row["state"], "stage": row["stage"],
        "host": row["host"], "logs": row["log_servers"], "endpoints": row["endpoints"],
        "results": {"patterns": row["results"], "stream": "results",
                    "servers": row["log_servers"]},
        "termination": termination, "ssh_host_keys": row.get("ssh_host_keys", []),
        "reservation": row.get("reservation", False), "deadline": row.get("deadline"),
        # Why a queued job still waits (only hosts out of service match it), if it does.
        "state_message": row.get("queue_message") if row["state"] == "queued" else None,
        "health_check": row.get("health_expect_exit") is not None,
        "hold_on_failure": row.get("hold_on_failure"), "held_until": row.get("held_until"),
        **{key: row[key] for key in ("created_at", "assigned_at", "started_at", "ready_at",
                                     "terminated_at", "updated_at")},
    }


def event(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in
            ("seq", "job", "at", "state", "stage", "reason", "exit_status", "message")}


def audit_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in
            ("id", "at", "actor", "actor_kind", "source", "action", "subject_kind",
             "subject_id", "subject_user", "details")}
