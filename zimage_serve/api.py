"""The HTTP API (FastAPI; OpenAPI at /docs). `create_app(settings)` builds it; `python -m zimage_serve api` serves it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from zimage_client.comfy_api import ComfyClient, ComfyError
from zimage_client.submit import WorkflowError

from . import auth, cache, config, jobs, quota


class JobRequest(BaseModel):
    """One generation: a bundled workflow by name (workflows/api/<name>.json) or an API-format workflow object,
    with the same options as `python -m zimage_client submit`."""
    model_config = ConfigDict(extra="forbid")
    workflow: str | dict[str, Any] = Field("zimage-turbo", description="bundled workflow name, or an API-format workflow")
    prompt: str | None = None
    negative: str | None = None
    seed: int | None = Field(None, description="default: the workflow's own seed (the same request gives the same image)")
    size: int | None = Field(None, description="width and height in pixels")
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    model: str | None = Field(None, description="diffusion model file for the Z-Image Checkpoint Loader")
    text_encoder: str | None = None
    vae: str | None = None
    group: str | None = Field(None, description="the group of a multi-group workflow the options go to")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    jobs: list[JobRequest] = Field(..., min_length=1, max_length=1000)


class Problem(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, headers


def create_app(settings: config.Settings | None = None) -> FastAPI:
    settings = settings or config.load()
    key = auth.verifying_key(settings)
    jobs_dir = Path(settings.jobs_dir).resolve()
    store = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10)
    from .tasks import app as celery_app  # the broker settings come from the same environment
    from .tasks import generate

    app = FastAPI(title="Z-Image generation service", version="1",
                  description="Jobs run the bundled Z-Image workflows (or your API workflow) on ComfyUI workers.")

    @app.exception_handler(Problem)
    def problem(_request: Request, exc: Problem):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(redis.ConnectionError)
    def redis_down(_request: Request, exc: redis.ConnectionError):
        return JSONResponse({"detail": f"the job store (Redis) cannot be reached: {exc}"}, status_code=503,
                            headers={"Retry-After": "5"})

    def claims(request: Request) -> dict:
        if key is None:  # no key configured: the API is bound to loopback only (see __main__), everyone is local
            return {"sub": "local", "scope": "generate admin"}
        try:
            return auth.verify(key, request.headers.get("authorization"))
        except auth.AuthError as e:
            raise Problem(401, str(e), {"WWW-Authenticate": "Bearer"}) from None

    def generator(c: dict = Depends(claims)) -> dict:
        if not auth.scopes_of(c) & {"generate", "admin"}:
            raise Problem(403, "this token's scope does not include generate")
        return c

    def own_job(job_id: str, c: dict) -> dict:
        job = jobs.load(store, job_id) if job_id.isalnum() else None
        if job is None or (job.get("subject") != c["sub"] and "admin" not in auth.scopes_of(c)):
            raise Problem(404, f"no job {job_id}")
        return job

    def unqueued(store, subject: str, job_ids: list[str], charged: int, error: Exception) -> None:
        """A request the broker refused part-way: its jobs end (the ones already sent are revoked, and a worker
        that gets one anyway skips it, being cancelled), and the jobs-a-minute it was charged are given back."""
        for job_id in job_ids:
            jobs.update(store, job_id, cancel=1)
            jobs.change(store, settings.log_dir, job_id, ("queued",), "failed", finished=time.time(),
                        error=f"could not be queued: the broker cannot be reached ({error})")
            quota.remove_active(store, subject, job_id)
            try:
                celery_app.control.revoke(job_id)
            except Exception:  # noqa: BLE001 - the broker is down; the cancel mark stops the job anyway
                pass
        quota.refund(store, subject, charged)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/readyz")
    def readyz():
        try:
            store.ping()
            depth = jobs.queue_depth(store)
        except redis.RedisError as e:
            return JSONResponse({"ready": False, "detail": f"Redis: {e}"}, status_code=503)
        ready = depth <= settings.queue_limit
        return JSONResponse({"ready": ready, "queued": depth, "limit": settings.queue_limit}, status_code=200 if ready else 503)

    @app.post("/v1/jobs", status_code=202)
    def submit(body: BatchRequest | JobRequest, request: Request, c: dict = Depends(generator)):
        items = body.jobs if isinstance(body, BatchRequest) else [body]
        try:
            built = [jobs.build(item.model_dump()) for item in items]
        except WorkflowError as e:
            raise Problem(422, str(e)) from None
        now = time.time()
        hits = [cache.get(store, b["workflow_sha256"]) for b in built]
        to_run = sum(hit is None for hit in hits)
        largest = quota.largest_batch(settings.jobs_per_minute, settings.max_queued)
        if to_run > largest:
            raise Problem(422, f"a request may hold at most {largest} jobs that are not cached (the quotas: "
                               f"{settings.jobs_per_minute} a minute, {settings.max_queued} queued); split it")
        if to_run:
            if jobs.queue_depth(store) + to_run > settings.queue_limit:
                raise Problem(503, f"the queue is full ({settings.queue_limit} jobs); try again later", {"Retry-After": "30"})
            wait = quota.check(store, c["sub"], to_run, settings.jobs_per_minute, settings.max_queued)
            if wait is not None:
                raise Problem(429, f"quota exceeded for {c['sub']} ({settings.jobs_per_minute} jobs a minute, "
                                   f"{settings.max_queued} queued)", {"Retry-After": str(wait)})
        answers, queued_here = [], []
        for fields, hit in zip(built, hits, strict=True):
            job_id = jobs.new_id()
            record = {"id": job_id, "subject": c["sub"], "received": now, "queued": now, **fields}
            if hit is not None:
                record.update(state="finished", cached=1, started=now, finished=now, source_job=hit["id"],
                              **{k: hit.get(k) for k in ("outputs", "worker", "comfy_url", "prompt_id", "nfe",
                                                         "peak_memory_bytes")},
                              steps=fields["steps"] or hit.get("steps"))
                job = jobs.create(store, settings.log_dir, record)
            else:
                record.update(state="queued", cached=0)
                job = jobs.create(store, settings.log_dir, record)
                quota.add_active(store, c["sub"], job_id)
                try:
                    generate.apply_async(args=[job_id], task_id=job_id, queue=settings.queue)
                except Exception as e:  # the broker is down: no job of this request may wait for ever, or run
                    unqueued(store, c["sub"], [job_id, *queued_here], to_run - len(queued_here), e)
                    raise Problem(503, f"the broker cannot be reached ({e}); no job of this request was queued",
                                  {"Retry-After": "5"}) from None
                queued_here.append(job_id)
            answers.append(jobs.public(job))
        status = 200 if all(a["cached"] for a in answers) else 202
        return JSONResponse({"jobs": answers} if isinstance(body, BatchRequest) else answers[0], status_code=status)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, c: dict = Depends(generator)):
        return jobs.public(own_job(job_id, c))

    @app.get("/v1/jobs/{job_id}/images/{n}")
    def get_image(job_id: str, n: int, c: dict = Depends(generator)):
        job = own_job(job_id, c)
        outputs = job.get("outputs") or []
        if not 0 <= n < len(outputs):
            raise Problem(404, f"job {job_id} has {len(outputs)} image(s) (state {job.get('state')})")
        output = outputs[n]
        path = Path(output["path"]).resolve()
        if path.is_relative_to(jobs_dir / job_id) and path.is_file():  # only what the service wrote for this job
            return FileResponse(path, media_type="image/png")
        try:  # a worker on another host wrote it: its ComfyUI still has it
            data = ComfyClient(job["comfy_url"], timeout=30).view(output["comfy"])
        except (ComfyError, OSError, KeyError, TypeError) as e:
            raise Problem(410, f"image {n} of job {job_id} is gone from {output['path']} and its ComfyUI: {e}") from None
        return Response(data, media_type="image/png")

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str, c: dict = Depends(generator)):
        job = own_job(job_id, c)
        if job["state"] in jobs.TERMINAL:
            raise Problem(409, f"job {job_id} already {job['state']}")
        jobs.update(store, job_id, cancel=1)  # first: a worker about to start it skips it
        done = jobs.change(store, settings.log_dir, job_id, ("queued",), "cancelled", finished=time.time(),
                           error="cancelled before it started")
        if done is not None:
            quota.remove_active(store, done.get("subject") or "", job_id)
            try:
                celery_app.control.revoke(job_id)
            except Exception:  # noqa: BLE001 - best effort: a worker that gets it skips it, being cancelled
                pass
            return jobs.public(done)
        job = jobs.load(store, job_id)
        if job["state"] == "running" and job.get("comfy_url") and job.get("prompt_id"):
            try:  # takes it off the server's queue, or interrupts it if it runs; never another client's prompt
                ComfyClient(job["comfy_url"], timeout=10).cancel([job["prompt_id"]])
            except (ComfyError, OSError):
                pass  # its worker sees the cancel mark and stops the run itself
        # The worker sees the cancel mark and ends the job as cancelled (or finished, if the run ended first).
        return JSONResponse(jobs.public(job), status_code=202)

    return app
