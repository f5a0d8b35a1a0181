"""The running service for the tests and bench/bench_serve.py: Redis, two ComfyUI servers (one CPU thread each), two
Celery workers and the API, all real (see tests/service/conftest.py)."""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import httpx

from zimage_client.server import ComfyServer, free_port
from zimage_serve import auth, config, processes

JOBS_PER_MINUTE = 30
MAX_QUEUED = 40  # above JOBS_PER_MINUTE, so that a minute's quota is met first


class Stack:
    """The running service; tests may stop and restart its parts (a worker, Redis)."""

    def __init__(self, root: Path, **settings):
        """`settings` override the tests' Settings (the benchmark lifts the quotas)."""
        self.root = root
        secret = auth.new_secret(root / "data" / "keys" / "jwt-secret")
        self.redis_port = free_port()
        chosen = dict(data_dir=root / "data", redis_url=f"redis://127.0.0.1:{self.redis_port}/0", jwt_secret_file=secret,
                      port=free_port(), jobs_per_minute=JOBS_PER_MINUTE, max_queued=MAX_QUEUED, queue_limit=200,
                      job_timeout=180.0, visibility_timeout=15, restore_interval=2, heartbeat=1.0, cache_ttl=3600)
        self.settings = replace(config.Settings(), **{**chosen, **settings})
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.redis = None
        self.comfy: list[ComfyServer] = []
        self.workers: list = [None, None]
        self.api = None

    def start(self) -> None:
        self.start_redis()
        self.comfy = [ComfyServer(self.root / f"comfyui{i}", cpu=True) for i in range(2)]
        errors = []

        def start(server):
            try:
                server.start()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        with processes.environment(OMP_NUM_THREADS=1, MKL_NUM_THREADS=1):  # one CPU thread per ComfyUI: 2 cores, 2 servers
            threads = [threading.Thread(target=start, args=(s,)) for s in self.comfy]
            [t.start() for t in threads]
            [t.join() for t in threads]
        if errors:
            raise errors[0]
        for i in range(2):
            self.start_worker(i)
        self.api = processes.start_api(self.settings)

    def start_redis(self) -> None:
        self.redis = processes.start_redis(self.root / "data" / "redis", self.redis_port)

    def stop_redis(self) -> None:
        processes.stop(self.redis)

    def start_worker(self, i: int) -> None:
        self.workers[i] = processes.start_worker(self.settings, self.comfy[i].url, f"w{i}")

    def stop_worker(self, i: int) -> None:
        processes.stop(self.workers[i])

    def kill_worker(self, i: int) -> None:
        processes.stop(self.workers[i], sig=9)

    def stop(self) -> None:
        processes.stop(self.api)
        for worker in self.workers:
            processes.stop(worker)
        for server in self.comfy:
            server.stop()
        processes.stop(self.redis)

    def seeds_run(self) -> list[int]:
        """The KSampler seeds of every prompt either ComfyUI ran to success (its /history), one entry per run."""
        from zimage_client.comfy_api import ComfyClient

        seeds = []
        for server in self.comfy:
            for entry in ComfyClient(server.url).get_json("/history?max_items=10000").values():
                if (entry.get("status") or {}).get("status_str") != "success":
                    continue  # interrupted or failed: not a run whose images anyone got
                prompt = entry["prompt"][2]
                seeds += [node["inputs"]["seed"] for node in prompt.values() if node["class_type"] == "KSampler"]
        return seeds

    def token(self, sub: str, scopes=("generate",), ttl: float = 3600) -> str:
        return auth.mint(self.settings, sub, list(scopes), ttl)

    def client(self, sub: str, scopes=("generate",)) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {self.token(sub, scopes)}"})

