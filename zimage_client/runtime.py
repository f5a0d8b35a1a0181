"""Where ComfyUI is: one rule, shared by install.py and the client (standard library only)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def existing_comfyui(root: Path = REPO_ROOT) -> Path | None:
    """The ComfyUI this plugin is installed into: $COMFYUI_PATH, or the ComfyUI whose custom_nodes/ holds it."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    if root.parent.name == "custom_nodes" and (root.parent.parent / "main.py").is_file():
        return root.parent.parent
    return None


def comfyui_dir(root: Path = REPO_ROOT) -> Path:
    """The ComfyUI to use: $ZIMAGE_COMFYUI_DIR (install.py sets it for the runtime it runs on), else the one the
    plugin is installed into, else the runtime install.py provisions on a bare machine (.comfyui/)."""
    if os.environ.get("ZIMAGE_COMFYUI_DIR"):
        return Path(os.environ["ZIMAGE_COMFYUI_DIR"]).expanduser().resolve()
    return existing_comfyui(root) or root / ".comfyui"
