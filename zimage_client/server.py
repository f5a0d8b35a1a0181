"""Start and stop a real, headless ComfyUI server on a free loopback port, with its own folders."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .comfy_api import ComfyClient, ComfyError
from .runtime import REPO_ROOT, comfyui_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model_paths(path: Path, models_dir: Path, name: str = "zimage") -> Path:
    """An extra_model_paths.yaml pointing every model kind the plugin uses at `models_dir`."""
    kinds = ("diffusion_models", "text_encoders", "vae", "checkpoints", "diffusers", "loras")
    body = f"{name}:\n    base_path: {models_dir}\n" + "".join(f"    {k}: {k}\n" for k in kinds)
    path.write_text(body)
    return path


class ComfyServer:
    """`with ComfyServer(workdir, models_dir) as server:` runs ComfyUI until the block ends, even on errors."""

    def __init__(self, workdir: Path, models_dir: Path | None = None, cpu: bool = True, port: int | None = None,
                 comfy_dir: Path | None = None, python: str | None = None, startup_timeout: float = 300.0):
        self.workdir = Path(workdir)
        self.models_dir = models_dir
        self.cpu = cpu
        self.port = port or free_port()
        self.comfy_dir = Path(comfy_dir or comfyui_dir())
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "comfyui.log"

    def dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def command(self) -> list[str]:
        cmd = [self.python, str(self.comfy_dir / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.dir("output")), "--input-directory", str(self.dir("input")),
               "--user-directory", str(self.dir("user")), "--temp-directory", str(self.dir("temp")),
               "--disable-auto-launch"]
        if self.cpu:
            cmd.append("--cpu")
        if self.models_dir is not None:
            cmd += ["--extra-model-paths-config", str(write_model_paths(self.workdir / "model_paths.yaml",
                                                                        Path(self.models_dir)))]
        return cmd

    def start(self) -> ComfyServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        plugin_link = self.comfy_dir / "custom_nodes" / "comfyui-zimage"
        if not plugin_link.exists() and REPO_ROOT.parent.name != "custom_nodes":
            raise ComfyError(f"the plugin is not linked into {plugin_link.parent}; run `python3 install.py` first")
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        client = ComfyClient(self.url, timeout=5)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                client.system_stats()
                return self
            except ComfyError:
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop this server's process group only."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def client(self, **kwargs) -> ComfyClient:
        return ComfyClient(self.url, **kwargs)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
