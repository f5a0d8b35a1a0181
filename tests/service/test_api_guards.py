"""The API's guards: keys that are too weak or not keys stop it before it serves, odd claims give no scope, a
batch no quota could ever pass is refused at once, and an image is served only from its job's own folder."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from zimage_testing import service_env

service_env.require()  # skips, saying why, before the service's packages are imported

import httpx  # noqa: E402
import jwt  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from zimage_testing.helpers import REPO_ROOT  # noqa: E402

from zimage_serve import auth, jobs  # noqa: E402


def api_refuses(tmp_path, **env) -> str:
    """stderr of `python -m zimage_serve api` started with these settings; it must exit instead of serving."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_SERVE_")}
    run = subprocess.run([sys.executable, "-m", "zimage_serve", "api", "--data-dir", str(tmp_path / "data")],
                         cwd=REPO_ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0, run.stdout
    return run.stderr


def test_a_short_or_missing_secret_and_a_key_that_is_not_one_stop_the_api(tmp_path):
    short = tmp_path / "short"
    short.write_text("hunter2")
    assert "at least 32" in api_refuses(tmp_path, ZIMAGE_SERVE_JWT_SECRET_FILE=str(short))
    assert "cannot read" in api_refuses(tmp_path, ZIMAGE_SERVE_JWT_SECRET_FILE=str(tmp_path / "absent"))
    pem = tmp_path / "public.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    assert "not an RSA public key" in api_refuses(tmp_path, ZIMAGE_SERVE_JWT_PUBLIC_KEY_FILE=str(pem))


def test_claims_that_are_not_names_or_scopes_grant_nothing(stack):
    secret = stack.settings.jwt_secret_file.read_text().strip()
    url = f"{stack.url}/v1/jobs/none"
    numeric_scope = jwt.encode({"sub": "carol", "exp": int(time.time()) + 600, "scope": 7}, secret, algorithm="HS256")
    assert httpx.get(url, headers={"Authorization": f"Bearer {numeric_scope}"}).status_code == 403
    assert auth.scopes_of({"scope": ["generate", 3]}) == {"generate"} and auth.scopes_of({"scope": {"a": 1}}) == set()


def test_a_batch_larger_than_the_quotas_allow_is_refused_at_once(stack):
    largest = min(stack.settings.jobs_per_minute, stack.settings.max_queued)
    answer = stack.client("big-batch").post("/v1/jobs", json={"jobs": [{"seed": 97000 + i} for i in range(largest + 1)]})
    assert answer.status_code == 422 and f"at most {largest} jobs" in answer.json()["detail"]
    assert "Retry-After" not in answer.headers  # waiting would never help


def test_an_image_is_served_only_from_its_jobs_folder(stack):
    client = stack.client("paths")
    job = client.post("/v1/jobs", json={"seed": 97500}).json()
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("finished", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["state"] == "finished"
    image = client.get(f"/v1/jobs/{job['id']}/images/0")
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    # A record whose image path names another file (the key, say) must not hand that file out.
    store = redis.Redis(port=stack.redis_port, decode_responses=True)
    record = jobs.load(store, job["id"])
    outputs = [{**record["outputs"][0], "path": str(stack.settings.jwt_secret_file), "comfy": {}}]
    store.hset(jobs.key(job["id"]), mapping=jobs.encode({"outputs": outputs}))
    answer = client.get(f"/v1/jobs/{job['id']}/images/0")
    secret = stack.settings.jwt_secret_file.read_text().strip()
    assert answer.status_code in (404, 410) and secret not in answer.text


@pytest.mark.parametrize("scope", ["generate admin", ["generate"]])
def test_both_scope_forms_are_read(scope):
    assert "generate" in auth.scopes_of({"scope": scope})
