"""Test harness: one real ComfyUI server per session, plus in-process access to ComfyUI and the plugin.

Server tests talk to the server only over HTTP and the websocket, as a user's client would.
Unit tests import ComfyUI in-process (CPU forced before `comfy.model_management` is imported).
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from zimage_client.runtime import import_comfy, import_plugin  # noqa: E402
from zimage_client.server import ComfyServer  # noqa: E402

import_comfy(cpu=True)
import_plugin()

# The bundled workflows and their labels in the canvas's Z-Image menu, as web/workflows.js lists them.
WORKFLOW_MENU = dict(re.findall(r'\["(zimage-[a-z-]+)", "([^"]+)"\]',
                                (REPO_ROOT / "web" / "workflows.js").read_text(encoding="utf-8")))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Tiny checkpoints in every supported format, and the broken files, in a ComfyUI models layout."""
    from devtools.bad_inputs import write_bad_inputs
    from devtools.checkpoint_fixtures import write_all

    path = tmp_path_factory.mktemp("models")
    write_all(path)
    write_bad_inputs(path, unpickled_canary(path))
    return path


def unpickled_canary(models_dir: Path) -> Path:
    """The file the pickle among the bad inputs creates if anything ever unpickles it."""
    return models_dir.parent / "UNPICKLED-CANARY"


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir):
    """A real ComfyUI (main.py --cpu) with the plugin, on a free loopback port; stopped even if tests fail."""
    srv = ComfyServer(tmp_path_factory.mktemp("comfyui"), models_dir=models_dir, cpu=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def client(server):
    return server.client()


def sampling_graph(model: str, text: str = "a red circle on a blue background", size: int = 64, steps: int = 2,
                   seed: int = 0, text_encoder: str = "auto", vae: str = "auto", weight_dtype: str = "default",
                   prefix: str = "test") -> dict:
    """Loader -> core ModelSamplingAuraFlow, CLIPTextEncode, KSampler, VAEDecode, SaveImage (API format)."""
    return copy.deepcopy({
        "1": {"class_type": "ZImageCheckpointLoader",
              "inputs": {"model": model, "text_encoder": text_encoder, "vae": vae, "weight_dtype": weight_dtype,
                         "compute_dtype": "default"}},
        "2": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": ["1", 5]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0],
                         "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    })

