"""The job record (a Redis hash per job) and the pure helpers that turn a request into a canonical workflow.

States: queued -> running -> finished | failed | cancelled; queued -> cancelled. A cached job is born finished.
Every change of state goes through `change`, which checks the state it leaves atomically (a Lua script) and
writes the request log line."""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path

from zimage_client.runtime import REPO_ROOT
from zimage_client.submit import WorkflowError, apply_options, describe, is_ui_workflow, of_type

from . import joblog

WORKFLOWS = REPO_ROOT / "workflows" / "api"
TERMINAL = ("finished", "failed", "cancelled")
QUEUED_SET = "zimage:queued"  # ids of the jobs waiting for a worker, scored by time: /readyz reads its size
JSON_FIELDS = ("workflow", "outputs", "node_errors")
FLOAT_FIELDS = ("received", "queued", "started", "finished", "heartbeat")
INT_FIELDS = ("seed", "width", "height", "steps", "step", "total", "nfe", "peak_memory_bytes", "cached", "cancel")
OPTIONS = ("prompt", "negative", "seed", "size", "width", "height", "steps", "model", "text_encoder", "vae", "group")


def key(job_id: str) -> str:
    return f"zimage:job:{job_id}"


def new_id() -> str:
    return uuid.uuid4().hex


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def canonical_json(workflow: dict) -> str:
    return json.dumps(workflow, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def workflow_sha256(workflow: dict) -> str:
    """The cache key: the same workflow, seed included, gives the same pictures."""
    return hashlib.sha256(canonical_json(workflow).encode()).hexdigest()


def bundled_workflow(name: str) -> dict:
    stem = name[:-5] if name.endswith(".json") else name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", stem) or not (WORKFLOWS / f"{stem}.json").is_file():
        names = ", ".join(sorted(p.stem for p in WORKFLOWS.glob("*.json")))
        raise WorkflowError(f"no bundled workflow {name!r}; use one of {names}, or send an API-format workflow object")
    return json.loads((WORKFLOWS / f"{stem}.json").read_text(encoding="utf-8"))


def build(request: dict) -> dict:
    """A request (workflow name or object, and submit's options) -> the fields of its job record.

    Raises WorkflowError with a one-line reason when the request cannot be applied."""
    try:  # a lone surrogate ("\ud800") has no UTF-8: the workflow's sha256 could not be taken
        json.dumps(request, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise WorkflowError("the request holds text that is not valid Unicode (a lone surrogate)") from None
    source = request.get("workflow")
    if source is None:  # only when absent: an empty name or object is refused below, not read as the default
        source = "zimage-turbo"
    if isinstance(source, str):
        name, workflow = (source[:-5] if source.endswith(".json") else source), bundled_workflow(source)
    elif isinstance(source, dict):
        if is_ui_workflow(source):
            raise WorkflowError('a UI workflow (nodes and links) was sent; send the API format ("Export (API)")')
        if not source or not all(isinstance(n, dict) and "class_type" in n for n in source.values()):
            raise WorkflowError("the workflow is not in the API format (an object of nodes, each with a class_type)")
        for node_id, node in source.items():
            if not isinstance(node.get("inputs"), dict):
                raise WorkflowError(f"node {node_id} has no inputs object (API format: \"inputs\": {{...}})")
            if not isinstance(node.get("_meta", {}), dict):
                raise WorkflowError(f"node {node_id}: _meta must be an object")
        name, workflow = "custom", source
    else:
        raise WorkflowError("workflow must be a bundled workflow's name or an API-format workflow object")
    size = request.get("size")
    if request.get("width") or request.get("height") or size:
        for node_id, node in of_type(workflow, ("EmptySD3LatentImage", "EmptyLatentImage")):
            missing = [n for n in ("width", "height") if n not in node["inputs"]]
            if missing:
                raise WorkflowError(f"node {node_id} ({node['class_type']}) has no {' or '.join(missing)} input to size")
    workflow = apply_options(workflow, text=request.get("prompt"), negative=request.get("negative"),
                             seed=request.get("seed"), width=request.get("width") or size,
                             height=request.get("height") or size, steps=request.get("steps"),
                             model=request.get("model"), text_encoder=request.get("text_encoder"),
                             vae=request.get("vae"), group=request.get("group"))
    described = describe(workflow, request.get("group"))
    latent = next((node["inputs"] for _, node in of_type(workflow, ("EmptySD3LatentImage", "EmptyLatentImage"))), {})
    steps = request.get("steps")
    if steps is None:  # a literal on the sampler; a link (the loader's recommended steps) is read from /ws later
        _, sampler = next(iter(of_type(workflow, ("KSampler", "KSamplerAdvanced"))), (None, {"inputs": {}}))
        steps = sampler["inputs"].get("steps") if isinstance(sampler["inputs"].get("steps"), int) else None
    return {"workflow": workflow, "workflow_name": name, "workflow_sha256": workflow_sha256(workflow),
            "prompt": described["prompt"], "prompt_sha256": sha256_text(described["prompt"]),
            "negative": described["negative"], "seed": described["seed"],
            "width": latent.get("width") if isinstance(latent.get("width"), int) else None,
            "height": latent.get("height") if isinstance(latent.get("height"), int) else None, "steps": steps}


# ---------------------------------------------------------------------------------------------------
# The record in Redis.

def encode(fields: dict) -> dict:
    out = {}
    for name, value in fields.items():
        if name in JSON_FIELDS:
            out[name] = json.dumps(value, ensure_ascii=False)
        elif isinstance(value, bool):
            out[name] = int(value)
        else:
            out[name] = "" if value is None else value
    return out


def decode(raw: dict) -> dict:
    job = {}
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        value = value.decode() if isinstance(value, bytes) else value
        if value == "":
            job[name] = None
        elif name in JSON_FIELDS:
            job[name] = json.loads(value)
        elif name in FLOAT_FIELDS:
            job[name] = float(value)
        elif name in INT_FIELDS:
            job[name] = int(value)
        else:
            job[name] = value
    return job


def load(r, job_id: str) -> dict | None:
    raw = r.hgetall(key(job_id))
    return decode(raw) if raw else None


def create(r, log_dir: Path, fields: dict) -> dict:
    job_id = fields["id"]
    pipe = r.pipeline()
    pipe.hset(key(job_id), mapping=encode(fields))
    if fields.get("state") == "queued":
        pipe.zadd(QUEUED_SET, {job_id: fields["queued"]})
    pipe.execute()
    job = load(r, job_id)
    joblog.write(log_dir, job)
    return job


# A compare-and-set: sets the fields only if the job is in one of the allowed states (comma-separated ARGV[1])
# and its fields named in the ARGV[2] pairs that follow still hold those values (a missing field reads ""); then
# the field pairs, state first. A job that leaves "queued" leaves the queued set (KEYS[2]) at once. 1 if it was set.
CHANGE = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 0 end
local ok = false
for st in string.gmatch(ARGV[1], '[^,]+') do if st == s then ok = true end end
if not ok then return 0 end
local n = tonumber(ARGV[2])
for i = 3, 2 + 2 * n, 2 do
  if (redis.call('HGET', KEYS[1], ARGV[i]) or '') ~= ARGV[i + 1] then return 0 end
end
for i = 3 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4 + 2 * n] ~= 'queued' then redis.call('ZREM', KEYS[2], ARGV[#ARGV]) end
return 1
"""


def change(r, log_dir: Path, job_id: str, allowed, state: str, expect: dict | None = None, **fields) -> dict | None:
    """Move a job to `state` if it is in one of `allowed` and its fields in `expect` still have those values;
    the new record (and a log line), or None."""
    expected = encode(expect or {})
    args = [",".join(allowed), len(expected)]
    for name, value in expected.items():
        args += [name, value]
    for name, value in encode({"state": state, **fields, "id": job_id}).items():
        args += [name, value]
    if not r.eval(CHANGE, 2, key(job_id), QUEUED_SET, *args):
        return None
    job = load(r, job_id)
    joblog.write(log_dir, job)
    return job


def update(r, job_id: str, **fields) -> None:
    """Fields that are not a change of state (progress, heartbeat, prompt id)."""
    r.hset(key(job_id), mapping=encode(fields))


def queue_depth(r) -> int:
    return r.zcard(QUEUED_SET)


def public(job: dict, base: str = "") -> dict:
    """What GET /v1/jobs/{id} answers."""
    received, queued, started, finished = (job.get(k) for k in ("received", "queued", "started", "finished"))
    progress = None
    if job.get("total"):
        progress = {"step": job.get("step") or 0, "steps": job["total"], "text": f"{job.get('step') or 0}/{job['total']}"}
    return {
        "id": job["id"], "state": job.get("state"), "cached": bool(job.get("cached")), "progress": progress,
        "workflow": job.get("workflow_name"), "workflow_sha256": job.get("workflow_sha256"),
        "prompt": job.get("prompt"), "negative": job.get("negative"), "seed": job.get("seed"),
        "width": job.get("width"), "height": job.get("height"), "steps": job.get("steps"),
        "timings": {"received": joblog.iso(received), "queued": joblog.iso(queued), "started": joblog.iso(started),
                    "finished": joblog.iso(finished),
                    "queue_wait_s": round(started - queued, 3) if started and queued else None,
                    "run_s": round(finished - started, 3) if finished and started else None},
        "worker": job.get("worker"), "prompt_id": job.get("prompt_id"), "nfe": job.get("nfe"),
        "peak_memory_bytes": job.get("peak_memory_bytes"),
        "images": [{"n": o["n"], "node": o["node"], "sha256": o["sha256"], "url": f"{base}/v1/jobs/{job['id']}/images/{o['n']}"}
                   for o in job.get("outputs") or []],
        "error": job.get("error"), "node_errors": job.get("node_errors"),
    }


def now() -> float:
    return time.time()
