"""blockdev-create as a QMP client runs it, for the format drivers'
differential tests: the same steps on either daemon, the outcome in a form
two daemons' outcomes compare in."""

from __future__ import annotations

from typing import Any


def run_create(q: Any, job_id: str, options: dict[str, Any]) -> tuple[str, Any]:
    """``blockdev-create`` on the legacy QMP client ``q``: ``("refused",
    error)`` when the command is refused, else ``("job", the job's error or
    None)`` once the job has concluded; the job is then dismissed."""
    r = q.cmd_raw("blockdev-create", {"job-id": job_id, "options": options})
    if "error" in r:
        return "refused", r["error"]
    while True:
        ev = q.pull_event(wait=30)
        if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == job_id \
                and ev["data"]["status"] == "concluded":
            break
    job = next(j for j in q.cmd("query-jobs") if j["id"] == job_id)
    q.cmd("job-dismiss", id=job_id)
    return "job", job.get("error")
