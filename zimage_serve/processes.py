"""Start and stop the service's processes: Redis, Celery workers and the API, each in its own process group,
with its log under the data folder. `up` and the service tests use the same functions."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from zimage_client.runtime import REPO_ROOT

from .config import Settings


class StartError(RuntimeError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def spawn(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def stop(process: subprocess.Popen | None, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Stop a process and its group (e.g. a Celery worker and its pool), and wait for it. SIGTERM goes to the main
    process only: a Celery worker then finishes its running job (a warm shutdown) and stops its pool itself, where
    its pool processes, told SIGTERM directly, would die mid-job. SIGKILL, or a process still there after the
    timeout, takes the whole group."""
    if process is None or process.poll() is not None:
        return
    try:
        if sig == signal.SIGTERM:
            process.send_signal(sig)
        else:
            os.killpg(process.pid, sig)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # anything of its group left behind (a pool process)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def redis_server() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise StartError("redis-server is not installed: `apt-get install redis-server` (Debian), or give --redis-url "
                         "of a running Redis")
    return found


def start_redis(data_dir: Path, port: int, timeout: float = 30.0) -> subprocess.Popen:
    """redis-server on 127.0.0.1:port with append-only persistence in data_dir (jobs survive a restart)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes", "--dir", str(data_dir),
           "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]
    process = spawn(cmd, data_dir / "redis.log")
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"redis-server exited with code {process.returncode}:\n{tail(data_dir / 'redis.log')}")
        try:
            if client.ping():
                return process
        except redis.exceptions.BusyLoadingError:
            pass  # replaying the append-only file
        except redis.ConnectionError:
            pass
        time.sleep(0.1)
    stop(process)
    raise StartError(f"redis-server did not answer within {timeout:.0f} s:\n{tail(data_dir / 'redis.log')}")


def wait_for_text(process: subprocess.Popen, log_path: Path, text: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"{what} exited with code {process.returncode}:\n{tail(log_path)}")
        if text in Path(log_path).read_text(errors="replace"):
            return
        time.sleep(0.2)
    stop(process)
    raise StartError(f"{what} did not start within {timeout:.0f} s:\n{tail(log_path)}")


def start_worker(settings: Settings, comfy_url: str, name: str, python: str | None = None,
                 timeout: float = 60.0) -> subprocess.Popen:
    """One Celery worker (concurrency 1, prefetch 1) for the ComfyUI at comfy_url; returns once it consumes."""
    log_path = Path(settings.log_dir) / f"worker-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    process = spawn([python or sys.executable, "-m", "zimage_serve", "worker", "--comfy-url", comfy_url, "--name", name],
                    log_path, settings.env())
    wait_for_text(process, log_path, " ready.", timeout, f"worker {name}")
    return process


def start_api(settings: Settings, python: str | None = None, timeout: float = 60.0) -> subprocess.Popen:
    log_path = Path(settings.log_dir) / "api.log"
    process = spawn([python or sys.executable, "-m", "zimage_serve", "api"], log_path, settings.env())
    url = f"http://{settings.host}:{settings.port}/healthz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"the API exited with code {process.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process
        except OSError:
            time.sleep(0.2)
    stop(process)
    raise StartError(f"the API did not answer at {url} within {timeout:.0f} s:\n{tail(log_path)}")


@contextlib.contextmanager
def environment(**values):
    """ComfyServer passes this process's environment to ComfyUI: set a few variables just while it starts."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
