"""Service benchmark: the generation service's throughput with one and two workers, its overhead per job against
the same jobs sent straight to one ComfyUI, and the jobs lost or run twice when a worker is killed mid-job.

    .venv/bin/python -m bench.bench_serve [--quick] [--jobs N]

One run, one process, the real parts (as the service tests run them): redis-server, two headless ComfyUI servers
with one CPU thread each (so two cores are shared fairly), one Celery worker per ComfyUI, and the API. On the nano
turbo workflow (128x128, 9 steps), every job with a seed of its own (no cache hits):
- direct: N jobs straight to ComfyUI 0, one after another (zimage_client, /prompt + /ws, images fetched), the
  baseline;
- one worker (worker 1 stopped): N jobs through the API (one batch); its time over direct's is `overhead_ratio`;
- two workers: 2N jobs; `scaling_2_workers` is their jobs per minute over one worker's;
each in two rounds (direct, one worker, two workers, twice) so that a machine whose speed drifts over the run
weighs on all three alike;
- kill: 4 longer jobs, worker 0 killed with SIGKILL mid-job; `lost_jobs` did not finish or never ran to success on
  a ComfyUI, `duplicated_jobs` ran to success more than once (counted in both ComfyUIs' /history, by seed).
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


def direct(stack, seeds: list[int], server: int = 0) -> float:
    """Seconds for the same jobs sent straight to one ComfyUI (ComfyUI 0, where the one-worker phase runs), one
    after another, each image fetched, as a user's program would do it."""
    from zimage_serve import jobs

    client = stack.comfy[server].client()
    start = time.perf_counter()
    for seed in seeds:
        result = client.run(jobs.build({"seed": seed})["workflow"], timeout=TURBO_SECONDS_BOUND)
        if result.status != "success":
            raise SystemExit(f"the direct run failed: {result.error}")
        for image in result.images():  # a program keeps its images, as the service's worker does
            client.view(image)
    return time.perf_counter() - start


def kill_mid_job(stack) -> tuple[int, int]:
    """(lost, duplicated) when worker 0 is killed with SIGKILL while it runs a job: by the real runs, each job's
    seed counted among the successful runs in both ComfyUIs' /history."""
    client = stack.client("kill")
    seeds = [9000 + i for i in range(4)]
    ids = [job["id"] for job in client.post("/v1/jobs", json={"jobs": [{"seed": seed, "steps": 30}
                                                                       for seed in seeds]}).json()["jobs"]]
    deadline = time.monotonic() + 120
    while not any((job := client.get(f"/v1/jobs/{i}").json())["state"] == "running" and job["worker"].startswith("w0@")
                  and (job.get("progress") or {}).get("step", 0) >= 1 for i in ids):
        if time.monotonic() > deadline:
            raise SystemExit("no job ran on worker 0")
        time.sleep(0.1)
    stack.kill_worker(0)
    done = wait_all(client, ids)
    runs = stack.seeds_run()
    lost = sum(job["state"] != "finished" or runs.count(job["seed"]) == 0 for job in done.values())
    return lost, sum(runs.count(seed) > 1 for seed in seeds)


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "8 jobs a phase instead of 40")
    ap.add_argument("--jobs", type=int, help="N, jobs a phase (default 40, --quick 8)")
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
            for server in (0, 1):  # both ComfyUIs load the models before anything is timed
                direct(stack, [1 + server], server)
            # Two rounds, each direct / one worker / two workers, so that a machine that speeds up or slows down
            # over the run weighs on all three alike. Two workers get twice the jobs: each does what one did.
            seconds = {"direct": 0.0, "one_worker": 0.0, "two_workers": 0.0}
            half = max(1, n // 2)
            for r in range(2):
                seconds["direct"] += direct(stack, [100 + 1000 * r + i for i in range(half)])
                stack.stop_worker(1)
                seconds["one_worker"] += through_service(stack, [200 + 1000 * r + i for i in range(half)], f"one-{r}")
                stack.start_worker(1)
                seconds["two_workers"] += through_service(stack, [300 + 1000 * r + i for i in range(2 * half)], f"two-{r}")
            print(", ".join(f"{name}: {s:.1f} s" for name, s in seconds.items()), flush=True)
            lost, duplicated = kill_mid_job(stack)
            print(f"worker killed mid-job: {lost} lost, {duplicated} duplicated", flush=True)
        finally:
            stack.stop()
    jobs_run = {"direct": 2 * half, "one_worker": 2 * half, "two_workers": 4 * half}
    per_minute = {name: round(60.0 * jobs_run[name] / s, 2) for name, s in seconds.items()}
    common.print_figures({
        "bench": "serve", "workflow": "zimage-turbo (nano, 128x128, 9 steps)", "jobs": jobs_run,
        "jobs_per_minute": per_minute,
        "scaling_2_workers": round(per_minute["two_workers"] / per_minute["one_worker"], 3),
        "overhead_ratio": round(seconds["one_worker"] / seconds["direct"], 3),
        "overhead_per_job_s": round((seconds["one_worker"] - seconds["direct"]) / (2 * half), 3),
        "lost_jobs": lost, "duplicated_jobs": duplicated,
        "quick": args.quick, "seconds": round(time.time() - started, 1), "machine": common.machine(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
