"""zimage_client.download against a local stand-in for Hugging Face (offline; 127.0.0.1 only).

The stand-in answers /{repo}/resolve/main/{path} as the hub does (302 carrying X-Linked-Etag and X-Linked-Size,
Location at the file server) and serves /files/{path} with Range support.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zimage_client import download

FILES = download.VARIANTS["turbo"]
PREFIX = f"/{FILES[0].repo}/resolve/main/"


class FakeHub:
    def __init__(self):
        rng = random.Random(0)
        self.data = {wf.path: rng.randbytes(size) for wf, size in zip(FILES, (300_000, 200_000, 100_000), strict=True)}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.wrong_sha: set[str] = set()  # paths whose advertised hash is wrong
        self.omit_hash = False
        self.ignore_range = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def log_message(self, *args):
                pass

            def answer(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                if self.path.startswith(PREFIX) and self.path[len(PREFIX):] in hub.data:
                    path = self.path[len(PREFIX):]
                    sha = hashlib.sha256(b"not it" if path in hub.wrong_sha else hub.data[path]).hexdigest()
                    self.send_response(302)
                    self.send_header("Location", f"{hub.url}/files/{path}")
                    self.send_header("ETag", '"' + "a" * 40 + '"')  # a git blob id: must not pass as a sha256
                    if not hub.omit_hash:
                        self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(hub.data[path])))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not (self.path.startswith("/files/") and self.path[7:] in hub.data):
                    self.send_error(404)
                    return
                data = hub.data[self.path[7:]]
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and not hub.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def gets(self, name: str = "") -> list[tuple[str, str, str | None]]:
        """GETs that reached the file server (the bytes), not the hub's redirect."""
        return [r for r in self.requests if r[0] == "GET" and r[1].startswith("/files/") and name in r[1]]


@pytest.fixture()
def hub():
    hub = FakeHub()
    hub.thread.start()
    try:
        yield hub
    finally:
        hub.server.shutdown()
        hub.server.server_close()
        hub.thread.join(5)


def run(hub, models, *extra) -> int:
    return download.main(["--models-dir", str(models), "--base-url", hub.url, *extra])


def final(models, wf):
    return models / wf.folder / wf.name


def test_full_download_lands_in_comfyui_folders(hub, tmp_path):
    models = tmp_path / "models"
    assert run(hub, models) == 0
    for wf in FILES:
        assert final(models, wf).read_bytes() == hub.data[wf.path]
        assert not final(models, wf).with_name(wf.name + ".part").exists()
    assert (models / "diffusion_models" / "z_image_turbo_bf16.safetensors").is_file()
    assert (models / "text_encoders" / "qwen_3_4b.safetensors").is_file()
    assert (models / "vae" / "ae.safetensors").is_file()
    assert {p.relative_to(models).parts[0] for p in models.rglob("*") if p.is_file()} == {
        "diffusion_models", "text_encoders", "vae"}


def write_part(models, wf, data: bytes):
    """An interrupted earlier download: the .part file the next run resumes from."""
    part = final(models, wf).with_name(wf.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    return part


def test_resume_sends_range_and_appends(hub, tmp_path):
    models = tmp_path / "models"
    wf = FILES[0]
    part = write_part(models, wf, hub.data[wf.path][:123_456])
    assert run(hub, models) == 0
    assert hub.gets(wf.name) == [("GET", f"/files/{wf.path}", "bytes=123456-")]
    assert final(models, wf).read_bytes() == hub.data[wf.path]
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    hub.ignore_range = True
    models = tmp_path / "models"
    wf = FILES[1]
    write_part(models, wf, hub.data[wf.path][:50_000])
    assert run(hub, models) == 0
    assert hub.gets(wf.name)[0][2] == "bytes=50000-"
    assert final(models, wf).read_bytes() == hub.data[wf.path]


def test_corrupt_part_fails_checksum_and_is_deleted(hub, tmp_path):
    models = tmp_path / "models"
    wf = FILES[2]
    part = write_part(models, wf, b"\0" * 1000)  # right length prefix, wrong bytes
    assert run(hub, models) == 1
    assert not final(models, wf).exists() and not part.exists()
    assert run(hub, models) == 0  # the next run starts clean
    assert final(models, wf).read_bytes() == hub.data[wf.path]


def test_checksum_mismatch_fails_without_final_file(hub, tmp_path, capsys):
    wf = FILES[0]
    hub.wrong_sha.add(wf.path)
    models = tmp_path / "models"
    assert run(hub, models) != 0
    assert not final(models, wf).exists()
    assert not final(models, wf).with_name(wf.name + ".part").exists()
    assert "sha256 mismatch" in capsys.readouterr().err
    for other in FILES[1:]:  # the others still arrive
        assert final(models, other).read_bytes() == hub.data[other.path]


def test_pinned_sha256_wins_over_server(hub, tmp_path, monkeypatch):
    wf = FILES[0]
    hub.wrong_sha.add(wf.path)
    pinned = download.WeightFile(wf.repo, wf.path, wf.folder, hashlib.sha256(hub.data[wf.path]).hexdigest())
    monkeypatch.setitem(download.VARIANTS, "turbo", (pinned,))
    models = tmp_path / "models"
    assert run(hub, models) == 0
    assert final(models, wf).read_bytes() == hub.data[wf.path]


def test_already_present_is_skipped_without_get(hub, tmp_path, capsys):
    models = tmp_path / "models"
    for wf in FILES:
        final(models, wf).parent.mkdir(parents=True, exist_ok=True)
        final(models, wf).write_bytes(hub.data[wf.path])
    assert run(hub, models) == 0
    assert hub.gets() == []
    assert capsys.readouterr().out.count("already present") == len(FILES)


def test_present_file_with_wrong_content_is_not_overwritten(hub, tmp_path):
    models = tmp_path / "models"
    wf = FILES[2]
    final(models, wf).parent.mkdir(parents=True)
    final(models, wf).write_bytes(b"x" * len(hub.data[wf.path]))
    assert run(hub, models) == 1
    assert final(models, wf).read_bytes() == b"x" * len(hub.data[wf.path])
    assert hub.gets(wf.name) == []


def test_missing_hash_is_refused_unless_no_verify(hub, tmp_path, capsys):
    hub.omit_hash = True
    models = tmp_path / "models"
    assert run(hub, models) == 1
    assert "--no-verify" in capsys.readouterr().err
    assert hub.gets() == []
    assert not any(p.is_file() for p in models.rglob("*"))

    assert run(hub, models, "--no-verify") == 0
    for wf in FILES:
        assert final(models, wf).read_bytes() == hub.data[wf.path]


def test_dry_run_writes_nothing(hub, tmp_path, capsys):
    models = tmp_path / "models"
    assert run(hub, models, "--dry-run") == 0
    assert not models.exists()
    assert hub.requests == []
    out = capsys.readouterr().out
    for wf in FILES:
        assert wf.url(hub.url) in out and str(final(models, wf)) in out


def test_unreachable_server_is_a_one_line_error(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = tmp_path / "models"
    assert download.main(["--models-dir", str(models), "--base-url", f"http://127.0.0.1:{port}"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(FILES) and all("cannot reach the server" in e for e in errors)
    assert not models.exists()


def test_default_models_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("ZIMAGE_COMFYUI_DIR", raising=False)
    plugin = tmp_path / "ComfyUI" / "custom_nodes" / "comfyui-zimage"
    plugin.mkdir(parents=True)
    (tmp_path / "ComfyUI" / "main.py").write_text("")  # what makes the folder above custom_nodes/ a ComfyUI
    assert download.default_models_dir(plugin) == tmp_path / "ComfyUI" / "models"
    assert download.default_models_dir(tmp_path / "repo") == tmp_path / "repo" / ".comfyui" / "models"
    monkeypatch.setenv("COMFYUI_PATH", os.fspath(tmp_path / "elsewhere"))
    assert download.default_models_dir(plugin) == tmp_path / "elsewhere" / "models"
