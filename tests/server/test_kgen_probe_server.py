"""k_gen probe and report in real graphs on a real ComfyUI server: figures read back from /history and /view."""
from __future__ import annotations

import json

import pytest

NANO = {"model": "diffusion_models/nano_zimage_turbo.safetensors", "text_encoder": "nano_qwen3.safetensors",
        "vae": "nano_ae.safetensors", "weight_dtype": "default", "compute_dtype": "default"}
REPORT = {"c_text": 1.0, "convergence_threshold": 0.95, "image_space": True, "save_history": True,
          "history_file": "zimage-kgen/test-history.jsonl", "filename_prefix": "zimage-kgen/test"}


def graph(steps: int = 8, cfg: float = 1.0, size: int = 128, batch: int = 1, seed: int = 1, report: dict | None = None,
          prune: bool = False) -> dict:
    """nano-turbo -> [pruning] -> k_gen probe -> ModelSamplingAuraFlow -> KSampler -> report (and a decode)."""
    g = {
        "1": {"class_type": "ZImageCheckpointLoader", "inputs": dict(NANO)},
        "2": {"class_type": "ZImageKGenProbe", "inputs": {"model": ["1", 0], "label": "", "x0_size": 32}},
        "3": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["2", 0], "shift": 3.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "蓝色背景上的红色圆形"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["3", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "res_multistep",
                         "scheduler": "simple", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
                         "denoise": 1.0}},
        "8": {"class_type": "ZImageKGenReport", "inputs": {"record": ["2", 1], "samples": ["7", 0], **(report or REPORT)}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    if prune:
        g["11"] = {"class_type": "ZImageEntropyPrunedAttention",
                   "inputs": {"model": ["1", 0], "calibration_steps": 2, "rule": "keep_ratio", "keep_ratio": 0.5,
                              "threshold": 0.9, "min_heads_per_layer": 1, "pruned_heads": "reuse",
                              "sample_queries": 64, "attention_backend": "comfy default"}}
        g["2"]["inputs"]["model"] = ["11", 0]
    return g


def report_of(result) -> dict:
    return json.loads(result.outputs["8"]["json"][0])


def test_nodes_are_registered_with_tooltips(client):
    info = client.object_info()
    probe, report = info["ZImageKGenProbe"], info["ZImageKGenReport"]
    assert probe["output"] == ["MODEL", "ZIMAGE_KGEN_RECORD"] and report["output_node"] is True
    for node in (probe, report):
        assert all(spec[1].get("tooltip") for spec in node["input"]["required"].values())


def test_probe_and_report_in_a_graph(client):
    result = client.run(graph(cfg=3.0, batch=2), timeout=300)
    assert result.status == "success", result.error
    r = report_of(result)
    assert r["nfe"] == 8 and r["completed"] and r["batch"] == 2 and r["resolution"] == "128x128"
    assert r["label"] == "z-image-turbo" and r["device"] == "cpu"
    assert r["k_gen"] == pytest.approx(8 / r["seconds"], rel=1e-4)
    assert len(r["convergence"]) == 8 and r["convergence"][-1] > 0.99
    assert r["fit"]["points"] >= 2 and 0 <= r["fit"]["r2"] <= 1
    assert len(r["convergence_image"]) == 8
    assert r["history"]["saved"] and "no Arrhenius" not in json.dumps(r["history"])
    assert any("No GPU temperature" in m for m in r["messages"])
    text = result.outputs["8"]["text"]
    assert text[0].startswith("z-image-turbo on cpu") and "k_gen" in text[0]
    assert result.outputs["8"]["images"], "the plots are shown on the node"
    folder, name = r["saved_to"].rsplit("/", 1)
    saved = json.loads(client.view({"filename": name, "subfolder": folder, "type": "output"}))
    assert saved["k_gen"] == r["k_gen"] and saved["nfe"] == 8


def test_history_grows_run_by_run(client):
    first = report_of(client.run(graph(seed=2, steps=3), timeout=300))
    second = report_of(client.run(graph(seed=3, steps=3), timeout=300))
    assert second["history"]["runs"] == first["history"]["runs"] + 1
    assert second["history"]["arrhenius"]["distinct_temperatures"] == 0  # CPU runs have no temperature


def test_probe_on_a_pruned_model(client):
    result = client.run(graph(seed=4, prune=True), timeout=300)
    assert result.status == "success", result.error
    assert report_of(result)["nfe"] == 8


def test_a_single_step_gives_a_report_that_says_there_is_no_fit(client):
    one_step = report_of(client.run(graph(seed=5, steps=1), timeout=300))
    assert one_step["nfe"] == 1 and any("No fit" in m for m in one_step["messages"])


def test_interrupted_run_then_the_next_prompt_works(client):
    def interrupt_on_progress(msg):
        if msg.get("type") == "progress" and msg["data"].get("node") == "7" and msg["data"].get("value", 0) >= 2:
            client.interrupt()

    stopped = client.run(graph(seed=7, steps=400, size=256, batch=2), timeout=300, on_message=interrupt_on_progress)
    assert stopped.status == "interrupted"
    result = client.run(graph(seed=8), timeout=300)
    assert result.status == "success", result.error
    assert report_of(result)["nfe"] == 8
