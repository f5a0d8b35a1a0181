"""Service benchmark: the generation service's throughput with one and two workers, its overhead per job against
the same jobs sent straight to one ComfyUI, and the jobs lost or run twice when a worker is killed mid-job.

    .venv/bin/python -m bench.bench_serve [--quick] [--jobs N]

One run, one process, the real parts (as the service tests run them): redis-server, two headless ComfyUI servers
with one CPU thread each (so two cores are shared fairly), one Celery worker per ComfyUI, and the API. On the nano
turbo workflow (128x128, 9 steps), every job with a seed of its own (no cache hits):
- direct: N jobs straight to ComfyUI 0, one after another (zimage_client, /prompt + /ws), the baseline;
- one worker (worker 1 stopped): N jobs through the API; its time over direct's is `overhead_ratio`;
- two workers: N jobs; `scaling_2_workers` is their jobs per minute over one worker's;
- kill: 4 longer jobs, worker 0 killed with SIGKILL mid-job; `lost_jobs` did not finish, `duplicated_jobs` were
  logged as finished more than once.
The last line is the JSON of the figures. Needs redis-server and requirements-serve.txt.
"""
from __future__ import annotations

import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench import common

common.import_test_fixtures()

from zimage_testing import service_env  # noqa: E402

TURBO_SECONDS_BOUND = 600.0  # a phase that takes longer than this has hung


def wait_all(client, ids: list[str], timeout: float = TURBO_SECONDS_BOUND) -> dict:
    """{id: job} once every job has ended. Asks about one job at a time, a few times a second: the benchmark's own
    requests must not take the CPU the workers measure."""
    deadline = time.monotonic() + timeout
    done = {}
    for job_id in ids:
        while (job := client.get(f"/v1/jobs/{job_id}").json()).get("state") not in ("finished", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(ids) - len(done)} job(s) did not end within {timeout:.0f} s")
            time.sleep(0.2)
        done[job_id] = job
    return done


def through_service(stack, seeds: list[int], subject: str) -> float:
    """Seconds from submitting the jobs (one batch) until the last one finished, by the job records' clocks."""
    client = stack.client(subject)
    start = time.time()
    answer = client.post("/v1/jobs", json={"jobs": [{"seed": seed} for seed in seeds]})
    if answer.status_code != 202:
        raise SystemExit(f"the service refused the batch: {answer.status_code} {answer.text}")
    done = wait_all(client, [job["id"] for job in answer.json()["jobs"]])
    failed = [job for job in done.values() if job["state"] != "finished"]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) did not finish: {failed[0]}")
    last = max(datetime.fromisoformat(job["timings"]["finished"]).timestamp() for job in done.values())
    return last - start


def direct(stack, seeds: list[int]) -> float:
    """Seconds for the same jobs sent straight to ComfyUI 0, one after another, each image fetched, as a user's
    program would do it."""
    from zimage_serve import jobs

    client = stack.comfy[0].client()
    start = time.perf_counter()
    for seed in seeds:
        result = client.run(jobs.build({"seed": seed})["workflow"], timeout=TURBO_SECONDS_BOUND)
        if result.status != "success":
            raise SystemExit(f"the direct run failed: {result.error}")
        for image in result.images():  # a program keeps its images, as the service's worker does
            client.view(image)
    return time.perf_counter() - start


def kill_mid_job(stack) -> tuple[int, int]:
    """(lost, duplicated) when worker 0 is killed with SIGKILL while it runs a job."""
    from zimage_serve import joblog

    client = stack.client("kill")
    ids = [job["id"] for job in client.post("/v1/jobs", json={"jobs": [{"seed": 9000 + i, "steps": 30}
                                                                       for i in range(4)]}).json()["jobs"]]
    deadline = time.monotonic() + 120
    while not any((job := client.get(f"/v1/jobs/{i}").json())["state"] == "running" and job["worker"].startswith("w0@")
                  and (job.get("progress") or {}).get("step", 0) >= 1 for i in ids):
        if time.monotonic() > deadline:
            raise SystemExit("no job ran on worker 0")
        time.sleep(0.1)
    stack.kill_worker(0)
    done = wait_all(client, ids)
    finished = {}
    for line in joblog.read(stack.settings.log_dir):
        if line["job_id"] in ids and line["status"] == "finished":
            finished[line["job_id"]] = finished.get(line["job_id"], 0) + 1
    lost = sum(job["state"] != "finished" for job in done.values())
    return lost, sum(count > 1 for count in finished.values())


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "8 jobs a phase instead of 40")
    ap.add_argument("--jobs", type=int, help="jobs a phase (default 40, --quick 8)")
    args = ap.parse_args()
    why_not = service_env.skip_reason()
    if why_not:
        raise SystemExit(f"cannot run the service here: {why_not}")
    from zimage_testing.service_stack import Stack

    n = args.jobs or (8 if args.quick else 40)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        stack = Stack(Path(tmp), jobs_per_minute=100_000, max_queued=100_000)
        try:
            stack.start()
            through_service(stack, [1, 2], "warm-up")  # both ComfyUIs load the models
            direct_s = direct(stack, [100 + i for i in range(n)])
            print(f"direct: {n} jobs in {direct_s:.1f} s", flush=True)
            stack.stop_worker(1)
            one_s = through_service(stack, [1000 + i for i in range(n)], "one-worker")
            print(f"one worker: {n} jobs in {one_s:.1f} s", flush=True)
            stack.start_worker(1)
            two_s = through_service(stack, [2000 + i for i in range(n)], "two-workers")
            print(f"two workers: {n} jobs in {two_s:.1f} s", flush=True)
            lost, duplicated = kill_mid_job(stack)
            print(f"worker killed mid-job: {lost} lost, {duplicated} duplicated", flush=True)
        finally:
            stack.stop()
    per_minute = {name: round(60.0 * n / seconds, 2) for name, seconds in
                  (("direct", direct_s), ("one_worker", one_s), ("two_workers", two_s))}
    common.print_figures({
        "bench": "serve", "workflow": "zimage-turbo (nano, 128x128, 9 steps)", "jobs_per_phase": n,
        "jobs_per_minute": per_minute,
        "scaling_2_workers": round(per_minute["two_workers"] / per_minute["one_worker"], 3),
        "overhead_ratio": round(one_s / direct_s, 3),
        "overhead_per_job_s": round((one_s - direct_s) / n, 3),
        "lost_jobs": lost, "duplicated_jobs": duplicated,
        "quick": args.quick, "seconds": round(time.time() - started, 1), "machine": common.machine(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
