"""Entropy-pruned attention in real graphs on a real ComfyUI server."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from PIL import Image

from zimage_client.comfy_api import PromptRejected

NANO = {"model": "diffusion_models/nano_zimage_turbo.safetensors", "text_encoder": "nano_qwen3.safetensors",
        "vae": "nano_ae.safetensors", "weight_dtype": "default", "compute_dtype": "default"}
PRUNE = {"calibration_steps": 3, "rule": "keep_ratio", "keep_ratio": 0.5, "threshold": 0.9, "min_heads_per_layer": 1,
         "pruned_heads": "reuse", "sample_queries": 128, "attention_backend": "comfy default"}


def graph(prune: dict | None, steps: int = 9, prefix: str = "prune") -> dict:
    """nano-turbo -> [pruning] -> ModelSamplingAuraFlow -> KSampler -> decode, save [and the report]."""
    g = {
        "1": {"class_type": "ZImageCheckpointLoader", "inputs": dict(NANO)},
        "2": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "蓝色背景上的红色圆形"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "seed": 7, "steps": steps, "cfg": 1.0, "sampler_name": "res_multistep",
                         "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                         "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if prune is not None:
        g["10"] = {"class_type": "ZImageEntropyPrunedAttention", "inputs": {"model": ["1", 0], **prune}}
        g["2"]["inputs"]["model"] = ["10", 0]
        g["11"] = {"class_type": "ZImagePruningReport", "inputs": {"model": ["10", 0], "samples": ["6", 0]}}
    return g


def pictures(client, result, prefix) -> list[np.ndarray]:
    images = sorted((img for img in result.images() if img["filename"].startswith(prefix)), key=lambda i: i["filename"])
    return [np.asarray(Image.open(io.BytesIO(client.view(img))).convert("RGB"), dtype=np.float32) for img in images]


def test_nodes_are_registered_with_tooltips(client):
    info = client.object_info()
    node = info["ZImageEntropyPrunedAttention"]
    assert node["display_name"] == "Z-Image Entropy-Pruned Attention"
    required = node["input"]["required"]
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert "pytorch" in required["attention_backend"][1]["options"]
    assert info["ZImagePruningReport"]["output_node"] is True


def test_pruned_sampling_in_a_graph_reports_its_heads_and_stays_close(client):
    full = client.run(graph(None, prefix="prune-off"), timeout=300)
    assert full.status == "success", full.error
    pruned = client.run(graph(PRUNE, prefix="prune-on"), timeout=300)
    assert pruned.status == "success", pruned.error
    text = pruned.outputs["11"]["text"][0]
    assert "heads" in text and "% of attention FLOPs removed" in text
    heads = [int(x) for x in text.split(" heads")[0].split("pruned ")[1].split("/")]
    assert 0 < heads[0] < heads[1]
    a, b = pictures(client, full, "prune-off"), pictures(client, pruned, "prune-on")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert 0 < np.abs(x - y).mean() < 40, "pruning half the heads changed the picture, but not beyond recognition"


def test_the_default_setting_refreshes_tracks_the_mean_and_reports_the_runs_saving(client):
    full = client.run(graph(None, prefix="default-off"), timeout=300)
    pruned = client.run(graph(dict(PRUNE, calibration_steps=2, keep_ratio=0.45, pruned_heads="track_mean",
                                   refresh_every=2), prefix="default-on"), timeout=300)
    assert full.status == pruned.status == "success", pruned.error
    text = pruned.outputs["11"]["text"][0]
    per_step, run = _removed(text)
    assert 0 < run < per_step  # 9 steps: 2 calibrate, 2 refresh (steps 4 and 7), 5 pruned
    for x, y in zip(pictures(client, full, "default-off"), pictures(client, pruned, "default-on"), strict=True):
        assert 0 < np.abs(x - y).mean() < 40


def _removed(text: str) -> tuple[float, float]:
    """(per pruned step, over the run) from the report's summary line, in percent."""
    per_step = float(text.split("% of attention FLOPs removed on pruned steps")[0].rsplit(" ", 1)[1])
    run = float(text.split("(")[1].split("% over the run")[0])
    return per_step, run


def test_a_negative_refresh_is_refused_and_the_server_goes_on(client):
    with pytest.raises(PromptRejected) as rejected:
        client.run(graph(dict(PRUNE, refresh_every=-1)), timeout=120)
    assert "refresh_every" in json.dumps(rejected.value.node_errors["10"])
    assert client.run(graph(PRUNE, steps=3, prefix="after-bad-refresh"), timeout=300).status == "success"


def test_keep_all_heads_gives_the_same_images_as_no_patch(client):
    full = client.run(graph(None, prefix="keep-off"), timeout=300)
    same = client.run(graph(dict(PRUNE, keep_ratio=1.0), prefix="keep-all"), timeout=300)
    assert full.status == same.status == "success"
    for x, y in zip(pictures(client, full, "keep-off"), pictures(client, same, "keep-all"), strict=True):
        assert np.array_equal(x, y)


def test_calibration_longer_than_sampling_warns_and_prunes_nothing(client):
    result = client.run(graph(dict(PRUNE, calibration_steps=20), steps=4, prefix="calib"), timeout=300)
    assert result.status == "success", result.error
    text = result.outputs["11"]["text"][0]
    assert "pruned 0/" in text and "not below the 4 sampling steps" in text


def test_keep_ratio_outside_0_1_is_refused_and_the_server_goes_on(client):
    with pytest.raises(PromptRejected) as rejected:
        client.run(graph(dict(PRUNE, keep_ratio=1.5)), timeout=120)
    assert "10" in rejected.value.node_errors
    assert "keep_ratio" in json.dumps(rejected.value.node_errors["10"])
    assert client.run(graph(PRUNE, steps=3, prefix="after-bad"), timeout=300).status == "success"


def test_report_without_a_patched_model_says_what_to_connect(client):
    g = graph(PRUNE, steps=2, prefix="unpatched-report")
    g["11"] = copy.deepcopy(g["11"])
    g["11"]["inputs"]["model"] = ["1", 0]
    result = client.run(g, timeout=300)
    assert result.status == "error"
    assert result.error["node_type"] == "ZImagePruningReport"
    assert "Connect the MODEL output of Z-Image Entropy-Pruned Attention" in result.error["exception_message"]


def test_a_model_that_is_not_nextdit_is_refused_and_the_server_goes_on(client):
    g = graph(PRUNE, steps=2, prefix="not-nextdit")
    g["12"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "sd15-unet-tiny_fp16.safetensors", "weight_dtype": "default"}}
    g["10"]["inputs"]["model"] = ["12", 0]
    result = client.run(g, timeout=300)
    assert result.status == "error"
    assert result.error["node_type"] == "ZImageEntropyPrunedAttention"
    message = result.error["exception_message"]
    assert "UNetModel, not a Z-Image / Lumina NextDiT" in message and "\n" not in message.strip()
    assert client.run(graph(PRUNE, steps=3, prefix="after-unet"), timeout=300).status == "success"
