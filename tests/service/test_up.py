"""`python -m zimage_serve up`: one command starts Redis, ComfyUI, a worker and the API, prints a token and the
URL, serves a job, and Ctrl-C stops every process it started. Also the RS256 keys, which `up` does not use."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from zimage_testing import service_env

service_env.require()  # skips, saying why, before the service's packages are imported

import httpx  # noqa: E402
import jwt  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
from zimage_testing.helpers import REPO_ROOT  # noqa: E402

from zimage_client.server import free_port  # noqa: E402
from zimage_serve import auth, config  # noqa: E402


def test_up_serves_a_job_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_SERVE_")}
    up = subprocess.Popen([sys.executable, "-m", "zimage_serve", "up", "--workers", "1", "--port", str(port),
                           "--data-dir", str(tmp_path / "data"), "--comfy-threads", "1"],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        out, token = [], None
        deadline = time.monotonic() + 240
        while token is None:
            line = up.stdout.readline()
            assert line and time.monotonic() < deadline, "up did not print a token:\n" + "".join(out)
            out.append(line)
            if line.startswith("TOKEN="):
                token = line.strip().split("=", 1)[1]
        assert re.search(rf"API: http://127\.0\.0\.1:{port}", "".join(out))
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # redis, ComfyUI, the worker (and its pool process), the API
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        job = client.post("/v1/jobs", json={"seed": 3, "workflow": "zimage-turbo"}).json()
        deadline = time.monotonic() + 120
        while job["state"] not in ("finished", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        assert job["state"] == "finished", job
        assert client.get(job["images"][0]["url"]).content.startswith(b"\x89PNG")
        assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir()  # append-only persistence, in our folder
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
        for child in children:  # never left behind, even when the test failed
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()
    assert up.returncode == 0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running: {[p.cmdline()[:3] for p in alive]}"


def test_rs256_tokens_verify_with_the_public_key(tmp_path):
    cryptography = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    key = cryptography.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "private.pem"
    public = tmp_path / "public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    minting = config.load({}, jwt_private_key_file=private)
    verifying = config.load({}, jwt_public_key_file=public)
    token = auth.mint(minting, "carol", ["generate", "admin"], ttl=60)
    claims = auth.verify(auth.verifying_key(verifying), f"Bearer {token}")
    assert claims["sub"] == "carol" and auth.scopes_of(claims) == {"generate", "admin"}
    forged = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, "a-guess", algorithm="HS256")
    with pytest.raises(auth.AuthError):  # an HS256 token is refused where RS256 is configured
        auth.verify(auth.verifying_key(verifying), f"Bearer {forged}")
