"""Download the real Z-Image weights (Comfy-Org's ComfyUI repackaging) into ComfyUI's model folders.

    python3 install.py download [--variant turbo] [--models-dir DIR] [--base-url URL] [--dry-run] [--no-verify]

Needs internet and is never run implicitly. Each file is fetched into ``<name>.part`` (an interrupted run resumes
it with an HTTP Range request), checked against the sha256 the server advertises (Hugging Face's
``X-Linked-Etag``) or a hash pinned below, and only then renamed to its final name. Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .runtime import REPO_ROOT, comfyui_dir

DEFAULT_BASE_URL = "https://huggingface.co"
CHUNK = 8 * 1024 * 1024
TIMEOUT_S = 60
USER_AGENT = "comfyui-zimage-download/1.0"
REDIRECTS = (301, 302, 303, 307, 308)
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# What a failed transfer can raise (URLError and socket timeouts are OSErrors; IncompleteRead is not).
TRANSFER_ERRORS = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class WeightFile:
    repo: str  # Hugging Face repo id
    path: str  # path inside the repo
    folder: str  # ComfyUI models/ subfolder it belongs in
    sha256: str | None = None  # pinned hash; wins over the server's when set

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/resolve/main/{urllib.parse.quote(self.path)}"


_TURBO = "Comfy-Org/z_image_turbo"
# One entry per variant; only turbo is released publicly. Pin sha256 values here once known.
VARIANTS: dict[str, tuple[WeightFile, ...]] = {
    "turbo": (
        WeightFile(_TURBO, "split_files/diffusion_models/z_image_turbo_bf16.safetensors", "diffusion_models"),
        WeightFile(_TURBO, "split_files/text_encoders/qwen_3_4b.safetensors", "text_encoders"),
        WeightFile(_TURBO, "split_files/vae/ae.safetensors", "vae"),
    ),
}


class DownloadError(Exception):
    """A failure with a message meant for the user (one line)."""


def default_models_dir(root: Path = REPO_ROOT) -> Path:
    """The models/ folder of the ComfyUI this plugin serves (see runtime.comfyui_dir)."""
    return comfyui_dir(root) / "models"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The sha256 rides on the hub's redirect response, not on the CDN's; so the HEAD must stop there.
    def redirect_request(self, *args, **kwargs):
        return None


def _sha256_header(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().removeprefix("W/").strip('"').lower()
    return value if SHA256_RE.fullmatch(value) else None  # a 40-hex ETag is a git blob id, not a sha256


def remote_info(url: str) -> tuple[str | None, int | None]:
    """(sha256, size) the server advertises for url, either possibly None."""
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(5):
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
        try:
            with opener.open(request, timeout=TIMEOUT_S) as response:
                status, headers = response.status, response.headers
        except urllib.error.HTTPError as e:
            if e.code not in REDIRECTS:
                raise
            status, headers = e.code, e.headers
            e.close()
        location = headers.get("Location")
        # Like huggingface_hub: follow same-site (relative) redirects, e.g. a renamed repo, but not the CDN one.
        if (status in REDIRECTS and location and not headers.get("X-Linked-Etag")
                and not urllib.parse.urlsplit(location).netloc):
            url = urllib.parse.urljoin(url, location)
            continue
        break
    sha = _sha256_header(headers.get("X-Linked-Etag")) or _sha256_header(headers.get("ETag"))
    # A redirect's Content-Length is that of its own (empty) body.
    size = headers.get("X-Linked-Size") or (headers.get("Content-Length") if status not in REDIRECTS else None)
    return sha, int(size) if size and size.isdigit() else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class Progress:
    """Percent and MB on stderr: redrawn in place on a terminal, a line every few seconds in a log."""

    def __init__(self, name: str, total: int | None):
        self.name, self.total = name, total
        self.tty = sys.stderr.isatty()
        self.interval = 0.2 if self.tty else 10.0
        self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        pct = f"{100 * done / self.total:5.1f}%  " if self.total else ""
        of = f" / {_mb(self.total)}" if self.total else ""
        line = f"  {self.name}  {pct}{_mb(done)}{of}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _transfer(url: str, part: Path, size: int | None) -> None:
    """Fetch url into part, appending to what a previous run left there when the server honours Range."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # not a prefix of this file: start over
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return  # complete already; the hash check decides
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing past our end: the .part is whole; the hash check decides
            e.close()
            return
        raise
    with response:
        if response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise DownloadError(f"server resumed at the wrong offset ({response.headers.get('Content-Range')})")
            mode = "ab"
        else:
            if offset:
                print(f"  server ignored the resume request; restarting {part.name}", file=sys.stderr)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = size if size is not None else (offset + int(length) if length and length.isdigit() else None)
        progress = Progress(part.name.removesuffix(".part"), total)
        done = offset
        with open(part, mode) as fh:
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                done += len(chunk)
                progress.update(done)
        progress.update(done, final=True)


def fetch(wf: WeightFile, base_url: str, models_dir: Path, verify: bool = True) -> str:
    """Make models_dir/<folder>/<name> hold the verified file; returns "present" or "downloaded"."""
    url = wf.url(base_url)
    final = models_dir / wf.folder / wf.name
    part = final.with_name(final.name + ".part")
    served_sha, size = remote_info(url)
    sha = wf.sha256 or served_sha
    if sha is None and verify:
        raise DownloadError("the server advertised no sha256 (X-Linked-Etag) and none is pinned; "
                            "re-run with --no-verify to download it unverified")

    if final.exists():
        have = final.stat().st_size
        if size is not None and have != size:
            raise DownloadError(f"{final} exists but is {have:,} bytes, expected {size:,}; "
                                "move or delete it and re-run")
        if sha is not None:
            print(f"  checking the sha256 of the existing {final.name}", file=sys.stderr)
            if sha256_of(final) != sha:
                raise DownloadError(f"{final} exists but its sha256 differs from {sha}; move or delete it and re-run")
        return "present"

    final.parent.mkdir(parents=True, exist_ok=True)
    _transfer(url, part, size)
    have = part.stat().st_size
    if size is not None and have != size:
        if have > size:
            part.unlink()
        raise DownloadError(f"got {have:,} bytes, expected {size:,}" + ("; re-run to resume" if have < size else ""))
    if sha is not None:
        print(f"  verifying sha256 of {wf.name}", file=sys.stderr)
        got = sha256_of(part)
        if got != sha:
            part.unlink()  # a corrupt prefix would poison every resume
            raise DownloadError(f"sha256 mismatch: expected {sha}, got {got}; the partial file was deleted")
    os.replace(part, final)  # same directory, so atomic: the final name only ever holds a whole file
    return "downloaded"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason} from {exc.url}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach the server: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="install.py download",
        description="Download the Z-Image weight files (Comfy-Org's ComfyUI repackaging from Hugging Face) into "
                    "ComfyUI's models/ folders. Resumable (re-run after an interruption) and sha256-verified.",
        epilog="Models folder, unless --models-dir is given: $COMFYUI_PATH/models, else the models/ of the "
               "ComfyUI whose custom_nodes/ holds this plugin, else <plugin>/.comfyui/models.")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="turbo", help="which model (default: turbo)")
    p.add_argument("--models-dir", type=Path, help="ComfyUI models folder to download into")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"Hugging Face endpoint or a mirror of it (default: {DEFAULT_BASE_URL})")
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched and where; touch nothing")
    p.add_argument("--no-verify", action="store_true",
                   help="allow files for which no sha256 is known (pinned or advertised by the server)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models_dir = (args.models_dir or default_models_dir()).expanduser().resolve()
    files = VARIANTS[args.variant]

    if args.dry_run:
        print(f"Would download Z-Image {args.variant} into {models_dir}:")
        for wf in files:
            dest = models_dir / wf.folder / wf.name
            part = dest.with_name(dest.name + ".part")
            state = ("  (present; would be verified)" if dest.exists()
                     else f"  (would resume from {_mb(part.stat().st_size)})" if part.exists() else "")
            print(f"  {wf.url(args.base_url)}\n    -> {dest}{state}")
        return 0

    print(f"Z-Image {args.variant}: {len(files)} files into {models_dir}")
    results = []
    for wf in files:
        print(f"{wf.folder}/{wf.name}")
        try:
            status = fetch(wf, args.base_url, models_dir, verify=not args.no_verify)
        except DownloadError as e:
            status = f"FAILED: {e}"
        except TRANSFER_ERRORS as e:
            status = f"FAILED: {_describe(e)}"
        except KeyboardInterrupt:
            print(f"\ninterrupted; re-run to resume {wf.name}", file=sys.stderr)
            return 130
        if status.startswith("FAILED"):
            print(f"error: {wf.name}: {status.removeprefix('FAILED: ')}", file=sys.stderr)
        elif status == "present":
            print("  already present")
        results.append((wf, status))

    failed = sum(status.startswith("FAILED") for _, status in results)
    print("\nSummary:")
    for wf, status in results:
        print(f"  {status.split(':', 1)[0]:<10}  {models_dir / wf.folder / wf.name}")
    print(f"{len(results) - failed} of {len(results)} files ready" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
