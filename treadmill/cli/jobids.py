"""Short job ids: a unique prefix of a job id stands for the whole id.

The switchboard resolves prefixes among the jobs the caller may read
(``GET /api/v1/jobs?id_prefix=``), so a prefix never reveals another user's job.
``tml-job-ID`` (the host name ``tml job ssh`` gives a job's SSH server) stands for
``ID``, so an ``ssh_config`` block ``Host tml-job-*`` with ``ProxyCommand tml job
ssh --proxy-command %h`` works.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from treadmill.cli.context import CommandError, Context, UsageError
from treadmill.cli.output import clean, fmt_time

_PREFIX = re.compile(r"[0-9a-fA-F-]{1,36}")
SHOWN_CANDIDATES = 10  # ambiguous prefixes list at most this many jobs
HOST_ALIAS_PREFIX = "tml-job-"  # tml-job-ID: a job's SSH host name (HostKeyAlias)


def full_job_id(text: str) -> str | None:
    """``text`` as a canonical job id, if it is a whole one."""
    try:
        return str(uuid.UUID(text)) if len(text) in (32, 36) else None
    except ValueError:
        return None


async def resolve_job_id(ctx: Context, text: str) -> str:
    """The id of the one job ``text`` names (a whole id, or a unique prefix of one,
    either also as ``tml-job-ID``)."""
    if text.startswith(HOST_ALIAS_PREFIX):
        text = text[len(HOST_ALIAS_PREFIX):]
    whole = full_job_id(text)
    if whole is not None:
        return whole
    digits = text.replace("-", "")
    if not _PREFIX.fullmatch(text) or not digits:
        raise UsageError(f"{text!r} is not a job id or a prefix of one (hexadecimal digits)")
    data = await ctx.api.get("jobs", params={"id_prefix": text,
                                             "limit": SHOWN_CANDIDATES + 1})
    jobs: list[dict[str, Any]] = [j for j in data.get("jobs", []) if isinstance(j, dict)
                                  and str(j.get("id", "")).replace("-", "").startswith(
                                      digits.lower())]
    if not jobs:
        raise CommandError(f"no job you can see has an id starting with {text}")
    if len(jobs) > 1:
        shown = jobs[:SHOWN_CANDIDATES]
        lines = "".join("\n  " + clean(f"{j['id']}  {j.get('state')}  "
                                        f"{fmt_time(j.get('created_at'))}") for j in shown)
        more = "\n  …and more" if len(jobs) > SHOWN_CANDIDATES else ""
        raise CommandError(f"job id prefix {text} is ambiguous; it matches:{lines}{more}")
    return str(jobs[0]["id"])


async def resolve_job_args(ctx: Context) -> None:
    """Replace the job id arguments of the command (``job_id_args``) by whole ids."""
    for name in getattr(ctx.args, "job_id_args", ()) or ():
        value = getattr(ctx.args, name, None)
        if isinstance(value, str):
            setattr(ctx.args, name, await resolve_job_id(ctx, value))
