"""Client tests: the standard-library client (zimage_client) and install.py. Nothing here imports ComfyUI or
torch in-process (tests/client/test_install.py checks it); the ComfyUI they talk to is a server process."""
from __future__ import annotations

import importlib.util
import sys

import pytest
from zimage_testing.helpers import REPO_ROOT


@pytest.fixture()
def install(monkeypatch):
    """install.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("zimage_install", REPO_ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
