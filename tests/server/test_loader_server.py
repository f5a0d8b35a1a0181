"""The Z-Image Checkpoint Loader in real graphs on a real ComfyUI server (through /prompt, /ws, /history, /view)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from zimage_testing.helpers import REPO_ROOT, sampling_graph

SOURCES = [
    "diffusion_models/tiny-zimage-turbo_bf16.safetensors",
    "diffusion_models/tiny-zimage-base_fp16.safetensors",
    "diffusion_models/tiny-zimage_fp32.safetensors",
    "diffusion_models/tiny-zimage-turbo_fp8_e4m3fn.safetensors",
    "diffusion_models/tiny-zimage-turbo_fp8_scaled.safetensors",
    "diffusion_models/tiny-zimage-turbo_mixed_fp8.safetensors",
    "checkpoints/tiny-zimage-turbo-aio.safetensors",
    "diffusers/tiny-zimage-turbo-diffusers",
]


def fetch_image(client, result) -> np.ndarray:
    images = result.images()
    assert len(images) == 1, result.history
    return np.asarray(Image.open(io.BytesIO(client.view(images[0]))).convert("RGB"), dtype=np.float32)


def test_plugin_registers_the_loader(client):
    info = client.object_info("ZImageCheckpointLoader")["ZImageCheckpointLoader"]
    assert info["display_name"] == "Z-Image Checkpoint Loader"
    assert info["output"][:3] == ["MODEL", "CLIP", "VAE"]
    models = info["input"]["required"]["model"][1]["options"]
    assert set(SOURCES) <= set(models)
    assert not any(m.endswith(".ckpt") for m in models), "only .safetensors files may be offered"
    assert info["input"]["required"]["model"][1]["tooltip"]


def test_the_shipped_nano_files_are_offered_by_our_loader_only(client):
    """Core's loaders cannot load nano files (their sizes are in no detection table), so they must not list them;
    the user's own files (the tiny fixtures here) stay in both."""
    inputs = client.object_info("ZImageCheckpointLoader")["ZImageCheckpointLoader"]["input"]
    ours = {**inputs["required"], **inputs.get("optional", {})}

    def options(spec):  # V1 ([list], {...}) on older core, V3 ("COMBO", {"options": [...]}) on newer
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    assert "diffusion_models/nano_zimage_turbo.safetensors" in options(ours["model"])
    assert "nano_qwen3.safetensors" in options(ours["text_encoder"]) and "nano_ae.safetensors" in options(ours["vae"])
    for node, input_name, user_file in (("UNETLoader", "unet_name", "tiny-zimage-turbo_bf16.safetensors"),
                                        ("CLIPLoader", "clip_name", "tiny-qwen3_bf16.safetensors"),
                                        ("VAELoader", "vae_name", "tiny-ae.safetensors")):
        listed = options(client.object_info(node)[node]["input"]["required"][input_name])
        assert user_file in listed
        assert not [name for name in listed if name.startswith("nano_")], f"{node} lists the package's nano files"


@pytest.mark.parametrize("source", SOURCES)
def test_every_format_samples_with_core_nodes(client, source):
    result = client.run(sampling_graph(source, prefix="fmt"), timeout=300)
    assert result.status == "success", result.error
    pixels = fetch_image(client, result)
    assert pixels.shape == (64, 64, 3)
    assert np.isfinite(pixels).all() and pixels.std() > 0.5, "the decoded image is constant"


@pytest.mark.parametrize("text_encoder", ["tiny-qwen3_fp8_scaled.safetensors", "tiny-qwen3_mixed_fp8.safetensors"])
def test_quantized_text_encoders_sample_with_core_nodes(client, text_encoder):
    """Through core's CLIPTextEncode; how close they come to the bf16 encoder: tests/unit/test_quantized_formats.py."""
    result = client.run(sampling_graph("diffusion_models/tiny-zimage-turbo_fp8_scaled.safetensors",
                                       text_encoder=text_encoder, prefix="te"), timeout=300)
    assert result.status == "success", result.error
    pixels = fetch_image(client, result)
    assert np.isfinite(pixels).all() and pixels.std() > 0.5, "the decoded image is constant"


def test_formats_of_the_same_weights_give_the_same_image(client):
    """bf16 split files, the all-in-one checkpoint and the diffusers folder hold the same tensors."""
    images = [fetch_image(client, client.run(sampling_graph(s, seed=7, prefix="same"), timeout=300))
              for s in ("diffusion_models/tiny-zimage-turbo_bf16.safetensors",
                        "checkpoints/tiny-zimage-turbo-aio.safetensors", "diffusers/tiny-zimage-turbo-diffusers")]
    assert np.abs(images[0] - images[1]).max() == 0
    assert np.abs(images[0] - images[2]).max() == 0


def test_recommended_settings_come_out_for_the_variant(client):
    graph = {
        "1": {"class_type": "ZImageCheckpointLoader",
              "inputs": {"model": "diffusion_models/tiny-zimage-base_fp16.safetensors", "text_encoder": "auto",
                         "vae": "auto", "weight_dtype": "default", "compute_dtype": "default"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 8]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 4]}},
    }
    result = client.run(graph, timeout=120)
    assert result.status == "success", result.error
    assert result.outputs["2"]["text"][0].startswith("base")
    assert result.outputs["3"]["text"][0] == "30"
    assert float(result.outputs["4"]["text"][0]) == 4.0


def test_lora_loader_patches_the_loaded_model(client, models_dir):
    import torch
    from safetensors.torch import save_file

    lora = models_dir / "loras" / "tiny-zimage-lora.safetensors"
    if not lora.exists():
        lora.parent.mkdir(exist_ok=True)
        gen = torch.Generator().manual_seed(3)
        sd = {}
        for i in range(2):
            base = f"diffusion_model.layers.{i}.attention.out"
            sd[f"{base}.lora_A.weight"] = torch.randn(4, 256, generator=gen)
            sd[f"{base}.lora_B.weight"] = torch.randn(256, 4, generator=gen)
        save_file(sd, str(lora))
    client.get_json("/object_info/LoraLoader")  # make the server rescan the folder list
    images = []
    for strength in (0.0, 2.0):
        graph = sampling_graph("diffusion_models/tiny-zimage-turbo_bf16.safetensors", seed=1, prefix="lora")
        graph["9"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                             "lora_name": lora.name, "strength_model": strength,
                                                             "strength_clip": 0.0}}
        graph["2"]["inputs"]["model"] = ["9", 0]
        result = client.run(graph, timeout=300)
        assert result.status == "success", result.error
        images.append(fetch_image(client, result))
    assert np.abs(images[0] - images[1]).mean() > 1.0, "the LoRA did not change the model"


def test_web_extension_is_served(client):
    scripts = client.get_json("/extensions")
    ours = {s.rsplit("/", 1)[-1]: s for s in scripts if "/comfyui-zimage/" in s}
    assert set(ours) == {p.name for p in (REPO_ROOT / "web").glob("*.js")}, scripts
    for url in ours.values():
        assert b"registerExtension" in client.get_bytes(url)


def test_every_node_has_a_help_page_in_english_and_chinese_served_where_the_frontend_asks(client):
    """The frontend's node help fetches /extensions/<package folder>/docs/<NodeId>/<locale>.md, then <NodeId>.md.
    Each page names every input and output of its node, so a renamed input cannot leave its page behind."""
    scripts = client.get_json("/extensions")
    base = next(s for s in scripts if "/comfyui-zimage/" in s).rsplit("/", 1)[0]
    info = client.object_info()
    ours = {name: node for name, node in info.items() if str(node.get("python_module", "")).endswith("comfyui-zimage")}
    assert len(ours) >= 9, sorted(ours)
    for name, node in ours.items():
        names = [*node["input"].get("required", {}), *node["input"].get("optional", {}), *node["output_name"]]
        for page in (f"{base}/docs/{name}.md", f"{base}/docs/{name}/zh.md"):
            text = client.get_bytes(page).decode("utf-8")
            missing = [n for n in names if n not in text]
            assert not missing, f"{page} does not name {missing}"


def test_only_the_model_file_is_needed_and_cfg_above_1_on_turbo_is_a_warning(client):
    """Users coming from CheckpointLoaderSimple set one file; the articles' cfg 7 on Turbo runs, with a warning in
    the canvas (a toast: the message comes over /ws) that names the fix."""
    graph = sampling_graph("diffusion_models/nano_zimage_turbo.safetensors")
    graph["1"]["inputs"] = {"model": "diffusion_models/nano_zimage_turbo.safetensors"}
    graph["6"]["inputs"]["cfg"] = 7.0
    warnings = []
    result = client.run(graph, timeout=300,
                        on_message=lambda m: warnings.append(m["data"]) if m.get("type") == "zimage.warning" else None)
    assert result.status == "success", result.error
    assert len(warnings) == 1 and "cfg 7 on Z-Image Turbo" in warnings[0]["message"]
    assert warnings[0]["prompt_id"] == result.prompt_id
    graph["6"]["inputs"]["cfg"] = 1.0
    warnings.clear()
    assert client.run(graph, timeout=300, on_message=lambda m: warnings.append(m) if m.get("type") == "zimage.warning"
                      else None).status == "success"
    assert not warnings
