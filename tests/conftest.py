"""Test harness for every kind of test: the markers, and one real ComfyUI server per session.

The tests are sorted by kind, each folder marked with its name: `unit/` (in-process, ComfyUI imported there),
`server/` (a real ComfyUI server, talked to over HTTP and the websocket as a user's client would), `client/` (the
standard-library client and install.py; ComfyUI is never imported in-process there) and `browser/` (chromium
driving the real frontend). A test that needs a running ComfyUI (the `server` fixture, or one it starts itself) or
builds an environment is also marked `live`; `python3 install.py test --fast` runs the rest.
This file imports neither ComfyUI nor torch: the fixture checkpoints are written by a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from zimage_testing.helpers import REPO_ROOT

from zimage_client.server import ComfyServer

KINDS = ("unit", "server", "client", "browser", "service")
ALWAYS_LIVE = ("server", "browser", "service")


def pytest_collection_modifyitems(items):
    tests = REPO_ROOT / "tests"
    for item in items:
        kind = Path(item.path).relative_to(tests).parts[0]
        if kind in KINDS:
            item.add_marker(kind)
        if kind in ALWAYS_LIVE or "server" in item.fixturenames:
            item.add_marker("live")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Tiny checkpoints in every supported format, and the hostile files, in a ComfyUI models layout
    (written by `python -m zimage_testing`, so that this process need not import ComfyUI)."""
    path = tmp_path_factory.mktemp("models")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "zimage_testing", str(path)], cwd=REPO_ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir):
    """A real ComfyUI (main.py --cpu) with the plugin, on a free loopback port; stopped even if tests fail."""
    srv = ComfyServer(tmp_path_factory.mktemp("comfyui"), models_dir=models_dir, cpu=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def client(server):
    return server.client()
