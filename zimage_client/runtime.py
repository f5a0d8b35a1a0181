"""Where the ComfyUI runtime is, and how in-process code (tests, benchmarks, tools) imports it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def comfyui_dir(root: Path = REPO_ROOT) -> Path:
    """The ComfyUI to use: $ZIMAGE_COMFYUI_DIR / $COMFYUI_PATH, the enclosing ComfyUI, or the provisioned one."""
    for var in ("ZIMAGE_COMFYUI_DIR", "COMFYUI_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser().resolve()
    if root.parent.name == "custom_nodes":
        return root.parent.parent
    return root / ".comfyui"


def import_comfy(cpu: bool | None = None) -> Path:
    """Put ComfyUI on sys.path and pick the device before `comfy.model_management` probes it at import.

    cpu=None uses CUDA when torch sees it; True forces the CPU (as `main.py --cpu`).
    """
    root = comfyui_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    args.cpu = bool(cpu)
    return root


def import_plugin(name: str = "comfyui_zimage"):
    """Import this repository as a package (its folder name may hold a hyphen), after import_comfy()."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
