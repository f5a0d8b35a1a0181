"""The service tests run the real thing: redis-server on a free loopback port (append-only, in a tmp folder), two
headless ComfyUI servers (one CPU thread each), two Celery worker processes and the API under uvicorn; all
stopped at the end, even when a test fails. Skipped, saying why, only when redis-server or the service's
Python packages (requirements-serve.txt) are missing."""
from __future__ import annotations

import pytest
from zimage_testing.service_env import skip_reason


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    if skip_reason():
        pytest.skip(skip_reason())
    from zimage_testing.service_stack import Stack

    s = Stack(tmp_path_factory.mktemp("service"))
    try:
        s.start()
        yield s
    finally:
        s.stop()
