"""Installed into an existing ComfyUI, the plugin's client works: install.py installs what it imports, and
`python -m zimage_client` runs from any directory once the plugin folder is on the path."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import venv

import pytest
from zimage_testing.helpers import REPO_ROOT

WORKFLOW = REPO_ROOT / "workflows" / "api" / "zimage-turbo.json"
EXIT_UNREACHABLE = 3  # zimage_client.submit's code for a server that cannot be reached


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def submit_to_nobody(python, cwd, env) -> subprocess.CompletedProcess:
    """The whole client path short of a server: parse, load the workflow, reach for the server, say why not."""
    return subprocess.run([str(python), "-m", "zimage_client", "submit", str(WORKFLOW), "--server",
                           f"http://127.0.0.1:{closed_port()}", "--out", str(cwd / "images")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("present", [False, True])
def test_run_inside_comfyui_installs_the_plugin_requirements_only_when_the_client_lacks_them(
        install, tmp_path, monkeypatch, present):
    calls = []
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    monkeypatch.setattr(install, "missing_client_imports", lambda: [] if present else ["websocket"])
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)) or subprocess.CompletedProcess(cmd, 0))
    assert install.main(["run", "--steps", "1"]) == 0
    pip = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert pip == ([] if present else [[sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                                         "-r", str(install.PLUGIN_REQUIREMENTS)]])
    assert calls[-1] == [sys.executable, "-m", "zimage_client.main_job", "--steps", "1"]


def test_the_client_runs_from_another_directory_with_the_plugin_folder_on_the_path(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lost = submit_to_nobody(sys.executable, elsewhere, client_env())
    assert lost.returncode != 0 and "No module named zimage_client" in lost.stderr  # why the path is needed

    env = client_env(PYTHONPATH=str(REPO_ROOT))
    result = submit_to_nobody(sys.executable, elsewhere, env)
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    assert "cannot be reached" in result.stderr
    main_job = subprocess.run([sys.executable, "-m", "zimage_client.main_job", "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=120)
    assert main_job.returncode == 0 and "usage" in main_job.stdout, main_job.stderr

    # Or with no path set, by the client folder's own path.
    by_path = subprocess.run([sys.executable, str(REPO_ROOT / "zimage_client"), "submit", str(WORKFLOW), "--server",
                              f"http://127.0.0.1:{closed_port()}", "--out", str(elsewhere / "images")],
                             cwd=elsewhere, env=client_env(), capture_output=True, text=True, timeout=120)
    assert by_path.returncode == EXIT_UNREACHABLE and "cannot be reached" in by_path.stderr, by_path.stderr


@pytest.mark.live  # a new virtual environment and a pip install
def test_install_into_an_existing_comfyui_gives_a_working_client(tmp_path):
    """A real install: a fresh interpreter standing for ComfyUI's, install.py run by it as ComfyUI-Manager does,
    then the client from another directory (pip uses the machine's configured index)."""
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    env_dir = tmp_path / "comfy-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = client_env(COMFYUI_PATH=str(comfy))
    before = subprocess.run([str(python), "-c", "import websocket"], env=env, capture_output=True, text=True)
    assert before.returncode != 0  # a bare interpreter: the install below is what brings the client's dependency

    installed = subprocess.run([str(python), str(REPO_ROOT / "install.py")], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=540)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert f"installing plugin dependencies for the ComfyUI at {comfy}" in installed.stdout

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = submit_to_nobody(python, elsewhere, client_env(PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    assert "cannot be reached" in result.stderr
    shutil.rmtree(env_dir)  # 200 MB; pytest keeps the last runs' temporary folders
