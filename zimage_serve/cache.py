"""Finished outputs by request: the canonical workflow's sha256 -> the job that made them, kept for a TTL."""
from __future__ import annotations

import json


def key(workflow_sha256: str) -> str:
    return f"zimage:cache:{workflow_sha256}"


def put(r, workflow_sha256: str, job: dict, ttl: int) -> None:
    if ttl <= 0:
        return
    entry = {k: job.get(k) for k in ("id", "outputs", "worker", "comfy_url", "prompt_id", "nfe", "peak_memory_bytes",
                                     "steps")}
    r.set(key(workflow_sha256), json.dumps(entry), ex=ttl)


def get(r, workflow_sha256: str) -> dict | None:
    """The cached entry; its images are served from the data folder, or else from the ComfyUI that made them."""
    raw = r.get(key(workflow_sha256))
    if not raw:
        return None
    entry = json.loads(raw)
    return entry if entry.get("outputs") else None
