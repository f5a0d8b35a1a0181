"""The generation service end to end: real Redis, real ComfyUI servers, real Celery workers, the real API.

Tests run in this file's order and share one stack (see conftest.py); each uses its own subject, so the quotas
of one do not touch another."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from zimage_testing import service_env

service_env.require()  # skips, saying why, before the service's packages are imported

import httpx  # noqa: E402
import jwt  # noqa: E402
import redis  # noqa: E402
from zimage_testing.helpers import REPO_ROOT  # noqa: E402

from zimage_client.comfy_api import ComfyClient  # noqa: E402
from zimage_client.submit import apply_options, load_workflow  # noqa: E402
from zimage_serve import joblog, jobs, processes  # noqa: E402

TURBO = REPO_ROOT / "workflows" / "api" / "zimage-turbo.json"
PROMPT = "蓝色背景上的红色圆形"
TERMINAL = ("finished", "failed", "cancelled")


def wait_for(client: httpx.Client, ids, timeout: float = 120.0, until=lambda job: job["state"] in TERMINAL) -> dict:
    """{id: job} once every job satisfies `until` (default: it ended)."""
    deadline = time.monotonic() + timeout
    pending, done = list(ids), {}
    while pending:
        for job_id in list(pending):
            try:
                job = client.get(f"/v1/jobs/{job_id}").json()
            except httpx.TransportError:
                continue
            if "state" in job and until(job):
                done[job_id] = job
                pending.remove(job_id)
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not done in {timeout:.0f} s: {[client.get(f'/v1/jobs/{i}').json() for i in pending]}")
        time.sleep(0.2)
    return done


def submit(client: httpx.Client, **request) -> dict:
    answer = client.post("/v1/jobs", json=request)
    assert answer.status_code in (200, 202), answer.text
    return answer.json()


def seeds_run(stack) -> list[int]:
    """The KSampler seeds of every prompt either ComfyUI ran to success (its /history), one entry per run."""
    return stack.seeds_run()


def runs_of(stack, seeds) -> list[int]:
    """The successful runs of these seeds, sorted: each seed exactly once when nothing was lost or run twice."""
    return sorted(s for s in seeds_run(stack) if s in set(seeds))


# ---------------------------------------------------------------------------------------------------
# Auth, quotas, readiness: no job runs.

def test_health_and_openapi(stack):
    assert httpx.get(f"{stack.url}/healthz").json() == {"ok": True}
    ready = httpx.get(f"{stack.url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"]
    assert "/v1/jobs" in httpx.get(f"{stack.url}/openapi.json").json()["paths"]
    assert httpx.get(f"{stack.url}/docs").status_code == 200


def test_auth_401_and_403(stack):
    url = f"{stack.url}/v1/jobs"
    assert httpx.post(url, json={}).status_code == 401  # no token
    forged = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 600, "scope": "generate"}, "not-the-secret",
                        algorithm="HS256")
    answer = httpx.post(url, json={}, headers={"Authorization": f"Bearer {forged}"})
    assert answer.status_code == 401 and "signature" in answer.json()["detail"].lower()
    expired = stack.token("alice", ttl=-10)
    answer = httpx.post(url, json={}, headers={"Authorization": f"Bearer {expired}"})
    assert answer.status_code == 401 and "expired" in answer.json()["detail"]
    secret = stack.settings.jwt_secret_file.read_text().strip()
    viewer = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, "scope": "view"}, secret, algorithm="HS256")
    assert httpx.post(url, json={}, headers={"Authorization": f"Bearer {viewer}"}).status_code == 403


def test_tokens_without_exp_or_with_alg_none_are_refused(stack):
    url = f"{stack.url}/v1/jobs/none"
    secret = stack.settings.jwt_secret_file.read_text().strip()
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, "scope": "admin generate"}, None,
                          algorithm="none")
    assert httpx.get(url, headers={"Authorization": f"Bearer {unsigned}"}).status_code == 401
    endless = jwt.encode({"sub": "alice", "scope": "generate"}, secret, algorithm="HS256")
    assert httpx.get(url, headers={"Authorization": f"Bearer {endless}"}).status_code == 401
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, "scope": "generate"}, secret, algorithm="HS256")
    assert httpx.get(url, headers={"Authorization": f"Bearer {good}"}).status_code == 404  # the same, valid


def test_token_command_and_refusing_an_open_bind_without_a_key(stack):
    env = {**os.environ, "ZIMAGE_SERVE_JWT_SECRET_FILE": str(stack.settings.jwt_secret_file)}
    token = subprocess.run([sys.executable, "-m", "zimage_serve", "token", "--sub", "bob", "--scope", "generate"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert httpx.get(f"{stack.url}/v1/jobs/none", headers={"Authorization": f"Bearer {token}"}).status_code == 404
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_SERVE_")}
    refused = subprocess.run([sys.executable, "-m", "zimage_serve", "api", "--host", "0.0.0.0", "--port", "1"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "refusing to listen on 0.0.0.0 without a key" in refused.stderr


def test_quotas_answer_429_with_retry_after(stack):
    client = stack.client("quota")
    if time.time() % 60 > 50:  # both requests in the same minute
        time.sleep(61 - time.time() % 60)
    first = submit(client, seed=90100)
    answer = client.post("/v1/jobs", json={"jobs": [{"seed": 90200 + i} for i in range(stack.settings.jobs_per_minute)]})
    assert answer.status_code == 429 and 0 < int(answer.headers["Retry-After"]) <= 61  # one more than a minute's
    assert wait_for(client, [first["id"]])[first["id"]]["state"] == "finished"


def test_the_queued_jobs_quota_answers_429_until_they_finish(stack):
    """max_queued alone: an API whose per-minute quota cannot be the one that refuses (the same data folder, so
    its jobs are logged and served as the stack's)."""
    from dataclasses import replace

    from zimage_client.server import free_port

    settings = replace(stack.settings, max_queued=2, jobs_per_minute=100_000, port=free_port())
    api = processes.start_api(settings)
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=60,
                          headers={"Authorization": f"Bearer {stack.token('queued-quota')}"})
    try:
        answer = client.post("/v1/jobs", json={"jobs": [{"seed": 91000}, {"seed": 91001}]})
        assert answer.status_code == 202, answer.text
        ids = [job["id"] for job in answer.json()["jobs"]]
        answer = client.post("/v1/jobs", json={"seed": 91002})
        assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 0, answer.text  # a third at once
        assert "queued" in answer.json()["detail"]
        done = wait_for(client, ids)
        assert all(job["state"] == "finished" for job in done.values()), done
        again = submit(client, seed=91002)  # the finished ones no longer count
        assert wait_for(client, [again["id"]])[again["id"]]["state"] == "finished"
    finally:
        client.close()
        processes.stop(api)


def test_readyz_is_503_when_the_queue_is_deeper_than_the_limit(stack, tmp_path):
    from dataclasses import replace

    from zimage_client.server import free_port

    settings = replace(stack.settings, queue_limit=0, port=free_port(), data_dir=tmp_path)
    api = processes.start_api(settings)
    store = redis.Redis(port=stack.redis_port)
    try:
        assert httpx.get(f"http://127.0.0.1:{settings.port}/readyz").status_code == 200
        store.zadd(jobs.QUEUED_SET, {"placeholder": 0})
        answer = httpx.get(f"http://127.0.0.1:{settings.port}/readyz")
        assert answer.status_code == 503 and answer.json()["queued"] == 1
    finally:
        store.zrem(jobs.QUEUED_SET, "placeholder")
        processes.stop(api)


# ---------------------------------------------------------------------------------------------------
# Jobs.

def test_a_bad_workflow_fails_with_its_node_errors_and_the_next_job_succeeds(stack):
    client = stack.client("bad")
    workflow = load_workflow(TURBO)
    workflow["6"]["inputs"]["denoise"] = 5.0  # above KSampler's maximum of 1: ComfyUI rejects the prompt
    bad = submit(client, workflow=workflow, seed=7001)
    good = submit(client, seed=7002)
    done = wait_for(client, [bad["id"], good["id"]])
    failed = done[bad["id"]]
    assert failed["state"] == "failed" and failed["workflow"] == "custom"
    assert "6" in failed["node_errors"] and "node 6 (KSampler) denoise" in failed["error"], failed
    assert done[good["id"]]["state"] == "finished"
    assert client.post("/v1/jobs", json={"workflow": "no-such-workflow"}).status_code == 422


def test_forty_jobs_from_four_clients_on_two_workers(stack):
    """40 finished, each run exactly once, each image bit-identical to the same workflow sent straight to ComfyUI."""
    seeds = {c: [1000 + 10 * c + i for i in range(10)] for c in range(4)}

    def client_run(c: int) -> list[str]:
        with stack.client(f"client{c}") as client:
            return [submit(client, seed=seed, prompt=PROMPT)["id"] for seed in seeds[c]]

    with ThreadPoolExecutor(4) as pool:
        ids = [job_id for batch in pool.map(client_run, range(4)) for job_id in batch]
    admin = stack.client("admin", ["admin"])
    done = wait_for(admin, ids, timeout=240)
    assert [j["state"] for j in done.values()].count("finished") == 40, [j for j in done.values() if j["state"] != "finished"]
    assert {j["worker"].split("@")[0] for j in done.values()} == {"w0", "w1"}  # both workers took jobs
    all_seeds = sorted(s for batch in seeds.values() for s in batch)
    assert runs_of(stack, all_seeds) == all_seeds  # each ran once, on one ComfyUI

    def reference(job: dict) -> tuple[str, bytes, bytes]:
        # straight to the ComfyUI that did not run it: the same picture from the other server too
        other = stack.comfy[1 if job["worker"].startswith("w0") else 0]
        prompt = apply_options(load_workflow(TURBO), text=PROMPT, seed=job["seed"])
        result = ComfyClient(other.url).run(prompt, timeout=120)
        assert result.status == "success", result.error
        image = next(img for img in result.outputs["8"]["images"])
        served = admin.get(f"/v1/jobs/{job['id']}/images/0")
        assert served.status_code == 200
        return job["id"], ComfyClient(other.url).view(image), served.content

    with ThreadPoolExecutor(2) as pool:
        for job_id, direct, served in pool.map(reference, done.values()):
            assert done[job_id]["images"][0]["node"] == "8"
            assert hashlib.sha256(served).hexdigest() == done[job_id]["images"][0]["sha256"]
            assert served == direct, f"job {job_id}: the service's image differs from ComfyUI's own"


def test_a_generate_token_sees_only_its_own_jobs(stack):
    owner, other = stack.client("owner"), stack.client("someone-else")
    job = submit(owner, seed=7100)
    job = wait_for(owner, [job["id"]])[job["id"]]
    assert job["state"] == "finished"
    assert owner.get(f"/v1/jobs/{job['id']}/images/0").status_code == 200
    assert other.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert other.get(f"/v1/jobs/{job['id']}/images/0").status_code == 404
    assert other.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert stack.client("admin", ["admin"]).get(f"/v1/jobs/{job['id']}").status_code == 200


def test_the_same_request_twice_is_cached_and_runs_once(stack):
    client = stack.client("cache")
    first = submit(client, seed=5000, prompt="a cached picture")
    first = wait_for(client, [first["id"]])[first["id"]]
    assert first["state"] == "finished" and not first["cached"]
    again = client.post("/v1/jobs", json={"seed": 5000, "prompt": "a cached picture"})
    assert again.status_code == 200
    second = again.json()
    assert second["state"] == "finished" and second["cached"] and second["id"] != first["id"]
    assert [i["sha256"] for i in second["images"]] == [i["sha256"] for i in first["images"]]
    assert client.get(f"/v1/jobs/{second['id']}/images/0").content == client.get(f"/v1/jobs/{first['id']}/images/0").content
    assert seeds_run(stack).count(5000) == 1  # ComfyUI's history: one run


def test_cancel_a_queued_and_a_running_job(stack):
    client = stack.client("cancel")
    blockers = [submit(client, seed=6000 + i, steps=60) for i in range(2)]  # both workers busy for a while
    queued = submit(client, seed=6100)
    answer = client.delete(f"/v1/jobs/{queued['id']}")
    assert answer.status_code == 200 and answer.json()["state"] == "cancelled", answer.text
    running = wait_for(client, [blockers[0]["id"]], timeout=60,
                       until=lambda j: j["state"] in TERMINAL or (j["progress"] or {}).get("step", 0) >= 2)
    assert running[blockers[0]["id"]]["state"] == "running", "the blocker ended before it could be cancelled"
    assert client.delete(f"/v1/jobs/{blockers[0]['id']}").status_code == 202
    done = wait_for(client, [b["id"] for b in blockers] + [queued["id"]], timeout=120)
    assert done[blockers[0]["id"]]["state"] == "cancelled"
    assert done[blockers[1]["id"]]["state"] == "finished"
    cancelled = done[blockers[0]["id"]]
    comfy = stack.comfy[0 if cancelled["worker"].startswith("w0@") else 1]  # the ComfyUI beside its worker
    deadline = time.monotonic() + 60
    while not (entry := ComfyClient(comfy.url).history(cancelled["prompt_id"])):  # the server's own record of it
        assert time.monotonic() < deadline, "the cancelled prompt never left its ComfyUI"
        time.sleep(0.5)
    messages = [message[0] for message in entry["status"]["messages"]]
    assert entry["status"]["status_str"] != "success" and "execution_interrupted" in messages, entry["status"]
    assert done[queued["id"]]["state"] == "cancelled" and done[queued["id"]]["prompt_id"] is None
    assert 6100 not in seeds_run(stack)  # the queued one never reached a ComfyUI
    assert client.delete(f"/v1/jobs/{queued['id']}").status_code == 409


def test_a_job_whose_worker_is_killed_finishes_on_the_other_worker(stack):
    client = stack.client("kill")
    ids = [submit(client, seed=8000 + i, steps=30)["id"] for i in range(4)]
    victim = None
    deadline = time.monotonic() + 60
    while victim is None:
        assert time.monotonic() < deadline, "no job ran on worker w0"
        for job_id in ids:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] == "running" and job["worker"].startswith("w0@") and (job["progress"] or {}).get("step", 0) >= 1:
                victim = job_id
        time.sleep(0.1)
    stack.kill_worker(0)  # SIGKILL to the worker and its pool process, mid-job
    try:
        done = wait_for(client, ids, timeout=150)
    finally:
        stack.start_worker(0)
    assert all(j["state"] == "finished" for j in done.values()), done
    assert done[victim]["worker"].startswith("w1@")
    seeds = [8000 + i for i in range(4)]
    assert runs_of(stack, seeds) == seeds  # none lost, none run twice: the killed one's too
    assert all(client.get(f"/v1/jobs/{i}/images/0").content.startswith(b"\x89PNG") for i in ids)


def test_jobs_queued_while_redis_restarts_survive_and_finish(stack):
    client = stack.client("restart")
    ids = [j["id"] for j in client.post("/v1/jobs", json={"jobs": [{"seed": 9000 + i} for i in range(6)]}).json()["jobs"]]
    stack.stop_redis()  # SIGTERM: Redis writes its append-only file and exits
    time.sleep(2)
    stack.start_redis()  # the same folder and port: the queue and the job records come back from the file
    done = wait_for(client, ids, timeout=150)
    assert all(j["state"] == "finished" for j in done.values()), done
    seeds = [9000 + i for i in range(6)]
    assert runs_of(stack, seeds) == seeds  # none lost, none run twice


def test_a_finished_job_delivered_again_is_not_run_twice(stack):
    from zimage_serve.tasks import make_app

    client = stack.client("again")
    job = submit(client, seed=9500)
    job = wait_for(client, [job["id"]])[job["id"]]
    assert job["state"] == "finished"
    lines = len(joblog.read(stack.settings.log_dir))
    app = make_app(stack.settings)
    result = app.send_task("zimage.generate", args=[job["id"]], queue=stack.settings.queue)  # the same job, again
    assert result.get(timeout=60) == "finished"  # the worker's answer, through the result store
    assert len(joblog.read(stack.settings.log_dir)) == lines  # no state change: nothing ran
    assert seeds_run(stack).count(9500) == 1
    assert client.get(f"/v1/jobs/{job['id']}").json()["timings"] == job["timings"]


# ---------------------------------------------------------------------------------------------------
# The request log, over everything above (runs last).

def test_the_request_log_holds_every_field_for_every_job(stack):
    lines = joblog.read(stack.settings.log_dir)
    assert lines
    secret = stack.settings.jwt_secret_file.read_text().strip()
    text = (stack.settings.log_dir / "requests.jsonl").read_text()
    assert secret not in text and "Bearer" not in text and "eyJ" not in text  # no key, no token
    last: dict[str, dict] = {}
    for line in lines:
        assert set(line) == set(joblog.FIELDS), line
        last[line["job_id"]] = line
    store = redis.Redis(port=stack.redis_port, decode_responses=True)
    job_ids = {k.split(":")[-1] for k in store.scan_iter("zimage:job:*")}
    assert job_ids == set(last)  # every job of the run has its lines
    finished = [line for line in last.values() if line["status"] == "finished"]
    assert len(finished) >= 50
    for line in finished:
        for name in ("subject", "received", "queued", "started", "finished", "queue_wait_s", "run_s", "worker",
                     "comfy_url", "prompt_id", "workflow_name", "workflow_sha256", "prompt", "prompt_sha256", "seed",
                     "width", "height", "steps", "nfe", "outputs_sha256"):
            assert line[name] not in (None, [], ""), (name, line)
        assert line["prompt_sha256"] == hashlib.sha256(line["prompt"].encode()).hexdigest()
        assert line["workflow_name"] == "zimage-turbo" and line["nfe"] >= line["steps"]
        assert line["peak_memory_bytes"] is None or line["peak_memory_bytes"] > 0  # null on the CPU
    for line in last.values():
        if line["status"] in ("failed", "cancelled"):
            assert line["error"], line
    events = {(line["job_id"], line["event"]) for line in lines}
    started = [job_id for job_id, line in last.items() if not line["cached"] and line["status"] == "finished"]
    assert all((job_id, "queued") in events and (job_id, "running") in events for job_id in started)
    assert json.dumps(lines, ensure_ascii=False)

