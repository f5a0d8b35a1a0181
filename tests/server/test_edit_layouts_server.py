"""A Z-Image Omni file samples through a real server, with a reference latent, where core runs Omni (0.33 and
later); elsewhere the node error says to update ComfyUI and the server goes on serving."""
from __future__ import annotations

import io

import numpy as np
from comfyui_zimage.nodes.compat import nextdit_takes_reference_latents
from PIL import Image
from zimage_testing.helpers import sampling_graph

OMNI = "diffusion_models/tiny-zimage-omni_bf16.safetensors"
CORE_OMNI = nextdit_takes_reference_latents()


def omni_graph(with_reference: bool) -> dict:
    graph = sampling_graph(OMNI, text_encoder="tiny-qwen3_bf16.safetensors", vae="tiny-ae.safetensors", seed=3,
                           prefix="omni")
    if with_reference:
        graph["9"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        graph["10"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["3", 0], "latent": ["9", 0]}}
        graph["6"]["inputs"]["positive"] = ["10", 0]
    return graph


def test_omni_file_samples_with_a_reference_in_a_graph_or_says_to_update(client):
    results = [client.run(omni_graph(ref), timeout=300) for ref in (False, True)]
    if not CORE_OMNI:
        for result in results:
            assert result.status == "error" and "Update ComfyUI" in result.error["exception_message"]
        assert client.run(sampling_graph("diffusion_models/tiny-zimage-turbo_bf16.safetensors"), timeout=300).status == "success"
        return
    images = []
    for result in results:
        assert result.status == "success", result.error
        (image,) = result.images()
        images.append(np.asarray(Image.open(io.BytesIO(client.view(image))).convert("RGB"), dtype=np.float32))
    assert np.abs(images[0] - images[1]).mean() > 0.5, "the reference latent did not reach core's Omni model"
