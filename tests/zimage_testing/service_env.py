"""Whether the service tests can run here: redis-server and the service's packages (requirements-serve.txt).

Each service test module calls `require()` before it imports them, so that it is skipped, saying why, where they
are missing (a conftest cannot skip)."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

PACKAGES = ("celery", "redis", "fastapi", "uvicorn", "jwt", "httpx")


def skip_reason() -> str | None:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"the service's packages are missing ({', '.join(missing)}): pip install -r requirements-serve.txt"
    if not shutil.which("redis-server"):
        return "redis-server is not installed: apt-get install redis-server (install.py test does it as root on Debian)"
    return None


def require() -> None:
    why = skip_reason()
    if why:
        print(f"\nservice tests skipped: {why}")
        pytest.skip(why, allow_module_level=True)
