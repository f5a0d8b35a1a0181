"""What the benchmarks share: ComfyUI's start-up, the memory and CUDA readers they measure with, the machine
description and the JSON line every run ends with."""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

from devtools.comfy_runtime import REPO_ROOT, import_comfy, import_plugin


def start_comfy(cpu: bool = False, plugin: bool = True) -> None:
    """Import ComfyUI on the CPU if `cpu` or --cpu is given (else CUDA when torch sees it), then this plugin.

    The device must be picked before `comfy.model_management` is imported, so --cpu is read from sys.argv here,
    before argparse runs. A benchmark imported by another one (once that one has started ComfyUI) keeps its device.
    """
    if "comfy.model_management" not in sys.modules:
        import_comfy(cpu=True if cpu or "--cpu" in sys.argv else None)
    if plugin:
        import_plugin()


def import_test_fixtures() -> None:
    """Put tests/ on sys.path, so the test suite's fixture generators (`zimage_testing`) import: benchmarks build
    the same tiny models from them."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)


def parser(description: str, quick_help: str) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: its description and --quick (a run of a few minutes)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def add_cpu_option(ap: argparse.ArgumentParser) -> None:
    """Declare --cpu, which start_comfy() has already read from sys.argv (it must act before ComfyUI imports)."""
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")


def rss_kib(field: str = "VmRSS") -> int:
    """The process's resident memory in KiB from /proc/self/status (VmRSS now, VmHWM its high-water mark)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    """Reset the RSS high-water mark (VmHWM) to the current RSS, so a peak is measured from here (Linux only)."""
    Path("/proc/self/clear_refs").write_text("5")


def sync() -> None:
    """Wait for the GPU's queued work, so a clock read after it counts that work (nothing on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    """The GPU's name where ComfyUI runs on CUDA, else "cpu": the JSON's `device`."""
    import comfy.model_management as mm
    import torch

    return torch.cuda.get_device_name() if mm.get_torch_device().type == "cuda" else "cpu"


def machine() -> str:
    """Architecture, torch threads and torch version: the JSON's `machine`, to tell runs on different machines apart."""
    import torch

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_figures(figures: dict, ensure_ascii: bool = True) -> None:
    """Print the figures as one JSON line, the run's last line (what RESULTS.md quotes and tools parse)."""
    print(json.dumps(figures, ensure_ascii=ensure_ascii), flush=True)
