"""The Z-Image Checkpoint Loader in real graphs on a real ComfyUI server (through /prompt, /ws, /history, /view)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import REPO_ROOT, sampling_graph
from PIL import Image

from zimage_client.comfy_api import PromptRejected

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


@pytest.mark.parametrize("source", SOURCES)
def test_every_format_samples_with_core_nodes(client, source):
    result = client.run(sampling_graph(source, prefix="fmt"), timeout=300)
    assert result.status == "success", result.error
    pixels = fetch_image(client, result)
    assert pixels.shape == (64, 64, 3)
    assert np.isfinite(pixels).all() and pixels.std() > 0.5, "the decoded image is constant"


@pytest.mark.parametrize("text_encoder", ["tiny-qwen3_fp8_scaled.safetensors", "tiny-qwen3_mixed_fp8.safetensors"])
def test_quantized_text_encoders_sample_with_core_nodes(client, text_encoder):
    """Through core's CLIPTextEncode; how close they come to the bf16 encoder: tests/test_quantized_formats.py."""
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


BAD_INPUTS = [
    # (model, text_encoder, vae, words the error must contain)
    ("diffusion_models/broken-truncated.safetensors", "auto", "auto", ["broken-truncated.safetensors", "truncated"]),
    ("diffusion_models/broken-corrupt.safetensors", "auto", "auto", ["broken-corrupt.safetensors", "corrupt"]),
    ("diffusion_models/not-zimage-sd15.safetensors", "auto", "auto", ["not-zimage-sd15.safetensors", "not a Z-Image",
                                                                     "SD1"]),
    ("diffusion_models/not-zimage-flux.safetensors", "auto", "auto", ["not-zimage-flux.safetensors", "Flux"]),
    ("diffusion_models/tiny-zimage-turbo_bf16.safetensors", "tiny-qwen3-wide_bf16.safetensors", "auto",
     ["tiny-qwen3-wide_bf16.safetensors", "96", "64"]),
    ("checkpoints/broken-no-text-encoder.safetensors", "auto", "auto", ["broken-no-text-encoder", "no text encoder"]),
    ("diffusers/broken-no-vae", "auto", "auto", ["broken-no-vae", "vae/"]),
]


@pytest.mark.parametrize("model,text_encoder,vae,words", BAD_INPUTS, ids=[b[0].split("/")[-1] for b in BAD_INPUTS])
def test_bad_input_gives_one_clear_node_error_and_the_server_goes_on(client, model, text_encoder, vae, words):
    graph = sampling_graph(model, text_encoder=text_encoder, vae=vae, prefix="bad")
    result = client.run(graph, timeout=120)
    assert result.status == "error"
    assert result.error["node_id"] == "1" and result.error["node_type"] == "ZImageCheckpointLoader"
    message = result.error["exception_message"]
    for word in words:
        assert word in message, message
    assert "\n" not in message.strip(), "one message, not a traceback"
    # /history records the same error for the UI.
    messages = dict(result.history["status"]["messages"])
    assert messages["execution_error"]["exception_message"] == message
    # The very next valid prompt succeeds.
    ok = client.run(sampling_graph("diffusion_models/tiny-zimage-turbo_bf16.safetensors", prefix="after"), timeout=300)
    assert ok.status == "success", ok.error


@pytest.fixture()
def outside_model(models_dir, tmp_path):
    """A complete diffusers model folder outside every model folder (next to the models, as an attacker's guess)."""
    import shutil

    outside = tmp_path / "outside-models" / "secret-zimage"
    shutil.copytree(models_dir / "diffusers" / "tiny-zimage-turbo-diffusers", outside)
    (outside / "transformer" / "private-notes.txt").write_text("not for the client")
    return outside


def test_diffusers_names_cannot_reach_a_folder_outside_the_model_folders(client, models_dir, outside_model):
    """Older ComfyUI passes any combo value a client sends; the loader must still read nothing outside."""
    import os

    for name in (f"diffusers/{outside_model}", f"diffusers//{outside_model}",
                 "diffusers/" + os.path.relpath(outside_model, models_dir / "diffusers")):
        try:
            result = client.run(sampling_graph(name, prefix="outside"), timeout=120)
        except PromptRejected:  # newer ComfyUI checks combo values first
            continue
        assert result.status == "error", f"{name} loaded a model from outside the model folders"
        message = result.error["exception_message"]
        assert "not a model folder in models/diffusers" in message
        assert "private-notes" not in message and str(outside_model.parent) not in message
    ok = client.run(sampling_graph("diffusion_models/tiny-zimage-turbo_bf16.safetensors", prefix="after"), timeout=300)
    assert ok.status == "success", ok.error


def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(client, models_dir):
    import json
    import shutil

    folder = models_dir / "diffusers" / "broken-index-outside"
    shutil.copytree(models_dir / "diffusers" / "tiny-zimage-turbo-diffusers", folder, dirs_exist_ok=True)
    index = next((folder / "transformer").glob("*.index.json"))
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../../tiny-zimage-turbo-diffusers/transformer/" + data["weight_map"][first]
    index.write_text(json.dumps(data))
    try:
        result = client.run(sampling_graph("diffusers/broken-index-outside", prefix="index"), timeout=120)
    except PromptRejected:  # the folder appeared after the server listed its models
        pytest.skip("this ComfyUI checks the model name against the list it had at start")
    assert result.status == "error" and "outside its folder" in result.error["exception_message"]


def test_an_unknown_weight_dtype_is_a_message_not_a_key_error(client):
    graph = sampling_graph("diffusion_models/tiny-zimage-turbo_bf16.safetensors", weight_dtype="int8")
    try:
        result = client.run(graph, timeout=120)
    except PromptRejected as e:  # newer ComfyUI checks combo values first
        assert "int8" in str(e)
        return
    assert result.status == "error"
    assert result.error["exception_message"].startswith("weight_dtype 'int8' is not one of default, fp8_e4m3fn")


def test_a_pickle_file_is_refused(client):
    """A .ckpt is never opened: refused at validation or by the loader, with a message saying why."""
    try:
        result = client.run(sampling_graph("diffusion_models/old-model.ckpt"), timeout=60)
    except PromptRejected as e:
        assert "old-model.ckpt" in str(e)
        return
    assert result.status == "error"
    assert "old-model.ckpt" in result.error["exception_message"]
    assert ".safetensors" in result.error["exception_message"]


def test_web_extension_is_served(client):
    scripts = client.get_json("/extensions")
    ours = {s.rsplit("/", 1)[-1]: s for s in scripts if "/comfyui-zimage/" in s}
    assert set(ours) == {p.name for p in (REPO_ROOT / "web").glob("*.js")}, scripts
    for url in ours.values():
        assert b"registerExtension" in client.get_bytes(url)
