"""The Celery app and its one task: run a job's workflow on this worker's ComfyUI.

A worker is `celery worker --concurrency 1 --prefetch-multiplier 1` beside one ComfyUI (ZIMAGE_SERVE_COMFY_URL):
that is the service's concurrency limit. Jobs are acknowledged late and rejected when their worker is lost, so
a job whose worker dies is delivered again (by the broker's visibility timeout when the whole worker died). The
job record makes that safe: a finished job is not run again, and a job another worker is still running (its
heartbeat is fresh) is waited for, not run twice."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import redis
from celery import Celery

from zimage_client.comfy_api import ComfyClient, ComfyError, PromptRejected, RunResult, RunTimeout
from zimage_client.submit import SAMPLERS, k_gen_of, of_type

from . import cache, config, jobs, quota

settings = config.load()
log = logging.getLogger("zimage_serve.tasks")


def make_app(s: config.Settings) -> Celery:
    app = Celery("zimage_serve", broker=s.broker, backend=s.backend)
    app.conf.update(
        task_acks_late=True,  # a job is acknowledged when it ends, so one whose worker dies is delivered again
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds only the job it runs
        task_default_queue=s.queue,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_expires=86400, result_backend_always_retry=True,
        broker_connection_retry_on_startup=True,
        # Redis broker: a job taken by a worker that died returns to the queue after the visibility timeout;
        # check every restore_interval seconds (kombu's default scans only every 100 s). The scan holds a lock in
        # Redis, which kombu keeps 5 minutes: a worker killed while it held the lock stopped every restore that
        # long, so it expires after a few scans' time instead.
        broker_transport_options={"visibility_timeout": s.visibility, "unacked_restore_interval": s.restore_interval,
                                  "unacked_restore_throttle": 1, "unacked_mutex_expire": max(10, 5 * s.restore_interval)},
        result_backend_transport_options={"visibility_timeout": s.visibility},
        worker_hijack_root_logger=False,
        # On a lost broker connection the running job goes on; its message is delivered again and the job record
        # (finished, or running with a fresh heartbeat) keeps it from running twice.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = make_app(settings)
_redis = None


def state_store(s: config.Settings = settings) -> redis.Redis:
    global _redis
    if _redis is None:  # per process: a prefork child makes its own after the fork
        _redis = redis.Redis.from_url(s.redis_url, decode_responses=True, socket_timeout=10, health_check_interval=10)
    return _redis


@app.task(name="zimage.generate", bind=True)
def generate(self, job_id: str) -> str:
    return run_job(settings, state_store(), job_id, worker=self.request.hostname or "worker")


def retrying(fn, *args, **kwargs):
    """fn(*args, **kwargs), a Redis write that must not be lost (a job's end), retried until Redis answers again
    (while it restarts), for up to three minutes."""
    deadline = time.monotonic() + 180.0
    while True:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def wait_for_owner(s: config.Settings, r, job_id: str, worker: str) -> dict | None:
    """A delivered job already marked running: wait while its worker's heartbeat moves. The job once it ended
    (then nothing is run), or the record to take over (its worker died).

    The heartbeat must stand still for stale_after seconds of this worker's own watching, with Redis answering:
    comparing it with the clock would take over every running job right after a Redis outage."""
    last, since = None, time.monotonic()
    while True:
        try:
            job = jobs.load(r, job_id)
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(1.0)
            last, since = None, time.monotonic()
            continue
        if job is None or job["state"] != "running" or job.get("worker") == worker:
            return job
        if job.get("heartbeat") != last:
            last, since = job.get("heartbeat"), time.monotonic()
        elif time.monotonic() - since > s.stale_after:
            return job
        time.sleep(min(1.0, s.heartbeat))


def run_job(s: config.Settings, r, job_id: str, worker: str) -> str:
    """Run the job, or see that it needs no run; never leaves it running or queued on an error of its own."""
    try:
        return take_and_run(s, r, job_id, worker)
    except Exception as e:  # last resort: a bug or an unforeseen error must not leave the job stuck for ever
        log.exception("job %s: internal error", job_id)
        job = retrying(jobs.load, r, job_id)
        if job is None or (job["state"] == "running" and job.get("worker") != worker):
            raise  # unknown, or another worker's now: not ours to end
        return retrying(end, s, r, job, "failed", error=f"internal error: {type(e).__name__}: {e}")


def take_and_run(s: config.Settings, r, job_id: str, worker: str) -> str:
    while True:
        job = retrying(jobs.load, r, job_id)
        if job is None:
            return "unknown"
        if job["state"] == "running":
            job = wait_for_owner(s, r, job_id, worker)
        if job is None or job["state"] in jobs.TERMINAL:
            return job["state"] if job else "unknown"  # a redelivered job that already ended is not run twice
        if job.get("cancel"):
            return retrying(end, s, r, job, "cancelled", error="cancelled before it started")
        # Compare and set: from queued only while still queued; a take-over only while the record still names the
        # stale worker and heartbeat seen above (another delivery may have taken it meanwhile: then look again).
        expect = {"worker": job.get("worker"), "heartbeat": job.get("heartbeat")} if job["state"] == "running" else None
        started = time.time()
        taken = retrying(jobs.change, r, s.log_dir, job_id, (job["state"],), "running", expect=expect,
                         started=started, heartbeat=started, worker=worker, comfy_url=s.comfy_url, prompt_id=None,
                         step=0, total=None)
        if taken is not None:
            break
    stop = threading.Event()
    threading.Thread(target=heartbeat, args=(s, r, job_id, stop), daemon=True).start()
    try:
        if job["state"] == "running" and job.get("comfy_url") and job.get("prompt_id"):
            done = take_over(s, r, taken, job)
            if done is not None:
                return done
        return execute(s, r, taken, worker)
    finally:
        stop.set()


def take_over(s: config.Settings, r, job: dict, previous: dict) -> str | None:
    """The dead worker's prompt on its ComfyUI: if it finished there, its images are collected and the job ends
    (the job's end, or None to run it here). Else it is taken back there, so that it does not run on two servers."""
    url, prompt_id = previous["comfy_url"], previous["prompt_id"]
    client = ComfyClient(url, timeout=10)

    def finished_there() -> dict | None:
        try:
            entry = client.history(prompt_id)
        except (ComfyError, OSError, ValueError):
            return None
        return entry if (entry.get("status") or {}).get("status_str") == "success" else None

    entry = finished_there()
    if entry is None:
        try:
            client.cancel([prompt_id])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # until it has left the server's queue, finished or interrupted
                queue = client.queue()
                if prompt_id not in {e[1] for k in ("queue_running", "queue_pending") for e in queue.get(k, [])}:
                    break
                time.sleep(0.2)
        except (ComfyError, OSError, ValueError):
            return None  # unreachable: run it here
        entry = finished_there()  # it may have finished before the cancel reached it
        if entry is None:
            return None
    result = RunResult(prompt_id, "success", entry)
    steps = previous.get("steps") or previous.get("total")
    return finish(s, r, job, client, result, steps, comfy_url=url, prompt_id=prompt_id)  # where its images are


def heartbeat(s: config.Settings, r, job_id: str, stop: threading.Event) -> None:
    while not stop.wait(s.heartbeat):
        try:
            jobs.update(r, job_id, heartbeat=time.time())
        except redis.RedisError:
            pass


def cancel_requested(r, job_id: str) -> bool:
    try:
        return r.hget(jobs.key(job_id), "cancel") == "1"
    except redis.RedisError:
        return False


def execute(s: config.Settings, r, job: dict, worker: str) -> str:
    job_id, workflow = job["id"], job["workflow"]
    client = ComfyClient(s.comfy_url, timeout=30)
    samplers = {node_id for node_id, _ in of_type(workflow, SAMPLERS)}

    def queue(prompt: dict) -> str | None:
        if cancel_requested(r, job_id):
            return None
        prompt_id = client.queue_prompt(prompt)
        retrying(jobs.update, r, job_id, prompt_id=prompt_id)
        return prompt_id

    def progress(msg: dict) -> None:
        data = msg.get("data", {})
        if msg.get("type") == "progress" and (not samplers or str(data.get("node")) in samplers):
            try:
                jobs.update(r, job_id, step=data.get("value"), total=data.get("max"))
            except redis.RedisError:
                pass  # progress is best effort; the job's end is not

    try:
        result = client.run(workflow, timeout=s.job_timeout, on_message=progress, queue=queue,
                            stopped=lambda: cancel_requested(r, job_id))
    except PromptRejected as e:
        return retrying(end, s, r, job, "failed", error=str(e), node_errors=e.node_errors)
    except RunTimeout as e:
        try:
            client.cancel([e.prompt_id])
        except (ComfyError, OSError):
            pass
        return retrying(end, s, r, job, "failed", error=str(e))
    except (ComfyError, OSError, ValueError) as e:  # also a failed /history read, a reply that is not JSON
        return retrying(end, s, r, job, "failed", error=f"ComfyUI at {s.comfy_url}: {e}")
    if cancel_requested(r, job_id):
        try:  # the API may have asked before the prompt id was known: make sure it is gone from the server
            client.cancel([result.prompt_id]) if result.prompt_id else None
        except (ComfyError, OSError):
            pass
        if result.status != "success":
            return retrying(end, s, r, job, "cancelled", error="cancelled while running")
    if result.status != "success":
        error = result.error or {}
        where = f"node {error.get('node_id')} ({error.get('node_type')})"
        message = ("interrupted on the server" if result.status in ("interrupted", "cancelled")
                   else f"{where}: {error.get('exception_message', '').strip()}")
        return retrying(end, s, r, job, "failed", error=message)
    steps = job.get("steps") or max((p[2] for p in result.progress if str(p[0]) in samplers and p[2]), default=None)
    return finish(s, r, job, client, result, steps)


def finish(s: config.Settings, r, job: dict, client: ComfyClient, result, steps, **fields) -> str:
    """A successful run: its images saved, the job finished."""
    try:
        outputs = save_outputs(s, client, job["id"], result)
    except (ComfyError, OSError, ValueError) as e:
        return retrying(end, s, r, job, "failed", error=f"the run finished but its images could not be saved: {e}")
    report = k_gen_of(result.outputs) or {}
    return retrying(end, s, r, job, "finished", outputs=outputs, nfe=report.get("nfe"),
                    peak_memory_bytes=report.get("peak_memory_bytes"), steps=steps, step=steps, total=steps, **fields)


def node_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def save_outputs(s: config.Settings, client: ComfyClient, job_id: str, result) -> list[dict]:
    """The run's saved images, in node order, to <data>/jobs/<job_id>/<n><suffix> (keyed by job id and number: a
    second delivery replaces the same files, never adds new ones). Each also names its file on the ComfyUI, so that
    an API on another host, without this folder, can fetch it from there."""
    import hashlib

    folder = s.jobs_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    for node_id in sorted(result.outputs, key=node_order):
        for image in result.outputs[node_id].get("images", []):
            if image.get("type", "output") != "output":
                continue
            data = client.view(image)
            n = len(outputs)
            path = folder / f"{n}{Path(image['filename']).suffix}"
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one writer's own
            tmp.write_bytes(data)
            tmp.replace(path)
            outputs.append({"n": n, "node": node_id, "path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest(),
                            "bytes": len(data), "comfy": {k: image.get(k, "") for k in ("filename", "subfolder", "type")}})
    return outputs


def end(s: config.Settings, r, job: dict, state: str, **fields) -> str:
    done = jobs.change(r, s.log_dir, job["id"], ("running", "queued"), state, finished=time.time(), **fields)
    if done is None:
        return (jobs.load(r, job["id"]) or {}).get("state", "unknown")
    quota.remove_active(r, done.get("subject") or "", done["id"])
    if state == "finished":
        cache.put(r, done["workflow_sha256"], done, s.cache_ttl)
    return state
