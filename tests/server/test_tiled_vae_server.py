"""The tiled VAE nodes in real graphs on a real ComfyUI server, beside core's VAEEncode / VAEDecode."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from zimage_testing.helpers import REPO_ROOT

NANO = {"model": "diffusion_models/nano_zimage_turbo.safetensors", "text_encoder": "nano_qwen3.safetensors",
        "vae": "nano_ae.safetensors", "weight_dtype": "default", "compute_dtype": "default"}


def loader():
    return {"class_type": "ZImageCheckpointLoader", "inputs": dict(NANO)}


def png(client, result, prefix: str) -> np.ndarray:
    images = [img for img in result.images() if img["filename"].startswith(prefix)]
    assert len(images) == 1, result.history
    return np.asarray(Image.open(io.BytesIO(client.view(images[0]))).convert("RGB"), dtype=np.float32)


def test_nodes_are_registered_with_tooltips(client):
    info = client.object_info()
    for node in ("ZImageTiledVAEDecode", "ZImageTiledVAEEncode"):
        assert info[node]["display_name"].startswith("Z-Image Tiled VAE")
        assert info[node]["input"]["required"]["tile_size"][1]["tooltip"]
        assert info[node]["input"]["required"]["tile_size"][1]["default"] == "auto"


def test_tiled_encode_and_decode_match_core_in_a_graph(client):
    data = (REPO_ROOT / "workflows" / "zimage-edit-example.png").read_bytes()
    name = client.upload_image("tiled-vae-input.png", data)["name"]
    graph = {
        "1": loader(),
        "2": {"class_type": "LoadImage", "inputs": {"image": name}},
        "3": {"class_type": "ZImageTiledVAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2], "tile_size": "64"}},
        "4": {"class_type": "ZImageTiledVAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2], "tile_size": "64"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "tiled-ours"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "tiled-core"}},
    }
    result = client.run(graph, timeout=300)
    assert result.status == "success", result.error
    ours, core = png(client, result, "tiled-ours"), png(client, result, "tiled-core")
    assert ours.shape == core.shape == (128, 128, 3)
    assert np.abs(ours - core).max() <= 1.0  # equal up to the 8-bit rounding of the PNG
    assert ours.std() > 10, "the round trip lost the picture"
