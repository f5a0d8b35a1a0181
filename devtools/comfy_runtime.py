"""ComfyUI in-process, for the tests, benchmarks, the nano trainer and the tools here (never the client)."""
from __future__ import annotations

import importlib.util
import sys

from zimage_client.runtime import REPO_ROOT, comfyui_dir

__all__ = ["REPO_ROOT", "import_comfy", "import_plugin"]


def import_comfy(cpu: bool | None = None):
    """Put ComfyUI on sys.path and pick the device before `comfy.model_management` probes it at import.

    cpu=None uses CUDA when torch sees it; True forces the CPU (as `main.py --cpu`). Returns ComfyUI's folder.
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
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
