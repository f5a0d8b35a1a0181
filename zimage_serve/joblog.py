"""The request log: one JSON line per job and state change, in <data>/logs/requests.jsonl. No tokens in it."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

FIELDS = ("job_id", "event", "subject", "received", "queued", "started", "finished", "queue_wait_s", "run_s", "worker",
          "comfy_url", "prompt_id", "workflow_name", "workflow_sha256", "prompt", "prompt_sha256", "negative", "seed",
          "width", "height", "steps", "nfe", "peak_memory_bytes", "outputs_sha256", "status", "cached", "error")


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def line(job: dict) -> dict:
    """The log record of a job (a decoded job record, see jobs.load)."""
    received, queued, started, finished = (job.get(k) for k in ("received", "queued", "started", "finished"))
    return {
        "job_id": job["id"], "event": job.get("state"), "subject": job.get("subject"),
        "received": iso(received), "queued": iso(queued), "started": iso(started), "finished": iso(finished),
        "queue_wait_s": round(started - queued, 3) if started is not None and queued is not None else None,
        "run_s": round(finished - started, 3) if finished is not None and started is not None else None,
        "worker": job.get("worker"), "comfy_url": job.get("comfy_url"), "prompt_id": job.get("prompt_id"),
        "workflow_name": job.get("workflow_name"), "workflow_sha256": job.get("workflow_sha256"),
        "prompt": job.get("prompt"), "prompt_sha256": job.get("prompt_sha256"), "negative": job.get("negative"),
        "seed": job.get("seed"), "width": job.get("width"), "height": job.get("height"), "steps": job.get("steps"),
        "nfe": job.get("nfe"), "peak_memory_bytes": job.get("peak_memory_bytes"),
        "outputs_sha256": [o["sha256"] for o in job.get("outputs") or []],
        "status": job.get("state"), "cached": bool(job.get("cached")), "error": job.get("error"),
    }


def write(log_dir: Path, job: dict) -> None:
    """Append one line; one write() on an O_APPEND file, so lines from the API and the workers never interleave."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    data = (json.dumps(line(job), ensure_ascii=False) + "\n").encode()
    fd = os.open(Path(log_dir) / "requests.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(log_dir: Path) -> list[dict]:
    path = Path(log_dir) / "requests.jsonl"
    if not path.is_file():
        return []
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines() if text.strip()]
