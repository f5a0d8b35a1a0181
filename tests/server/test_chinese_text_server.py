"""Chinese text encode in real graphs on a real ComfyUI server, and the zh locale of every node."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from zimage_testing.helpers import REPO_ROOT

from nano import detector

NANO = {"model": "diffusion_models/nano_zimage_turbo.safetensors", "text_encoder": "nano_qwen3.safetensors",
        "vae": "nano_ae.safetensors", "weight_dtype": "default", "compute_dtype": "default"}


def graph(text: str, prefix: str, seed: int = 42, encoder: str = "ZImageChineseTextEncode", normalise: bool = True) -> dict:
    encode = ({"clip": ["1", 1], "text": text, "normalise": normalise, "template": "z-image chat"}
              if encoder == "ZImageChineseTextEncode" else {"clip": ["1", 1], "text": text})
    negative = dict(encode, text="")
    return {
        "1": {"class_type": "ZImageCheckpointLoader", "inputs": dict(NANO)},
        "2": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": ["1", 5]}},
        "3": {"class_type": encoder, "inputs": encode},
        "4": {"class_type": encoder, "inputs": negative},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "seed": seed, "steps": ["1", 3], "cfg": ["1", 4], "sampler_name": ["1", 6],
                         "scheduler": ["1", 7], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                         "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def picture(client, result, prefix) -> Image.Image:
    image = next(i for i in result.images() if i["filename"].startswith(prefix))
    return Image.open(io.BytesIO(client.view(image))).convert("RGB")


def test_plain_prompt_gives_the_same_picture_as_core_clip_text_encode(client):
    # Normalisation off (plain text has nothing to normalise): an input no other test sends, so the node runs here
    # even after the browser tests ran this prompt, and its text is in this run's outputs rather than cached.
    ours = client.run(graph("蓝色背景上的红色圆形", "zh-ours", normalise=False), timeout=300)
    core = client.run(graph("蓝色背景上的红色圆形", "zh-core", encoder="CLIPTextEncode"), timeout=300)
    assert ours.status == core.status == "success", (ours.error, core.error)
    assert np.array_equal(np.asarray(picture(client, ours, "zh-ours")), np.asarray(picture(client, core, "zh-core")))
    assert ours.outputs["3"]["text"][0].startswith("5 tokens (max 512)")


def test_chinese_prompt_and_its_english_translation_read_the_same(client):
    """The attributes nano-turbo draws reliably: the background and the object's colour."""
    readings = {}
    for lang, text in (("zh", "蓝色背景上的红色圆形"), ("en", "a red circle on a blue background")):
        result = client.run(graph(text, f"pair-{lang}"), timeout=300)
        assert result.status == "success", result.error
        readings[lang] = detector.read(picture(client, result, f"pair-{lang}"))
    zh, en = readings["zh"], readings["en"]
    assert zh.background == en.background == "blue"
    assert {b.colour for b in zh.objects} == {b.colour for b in en.objects} == {"red"}


def test_weighted_span_changes_the_picture(client):
    plain = client.run(graph("蓝色背景上的红色圆形", "w-plain", seed=3), timeout=300)
    weighted = client.run(graph("蓝色背景上的(红色:2.5)圆形", "w-heavy", seed=3), timeout=300)
    assert plain.status == weighted.status == "success"
    a = np.asarray(picture(client, plain, "w-plain"), dtype=np.float32)
    b = np.asarray(picture(client, weighted, "w-heavy"), dtype=np.float32)
    # Equal conditioning gives bit-equal pictures (the test above), so any change is the weight's; 0.25 of 255 keeps
    # clear of rounding (the shipped nano-turbo holds the red circle firmly: 1.8 moved it 0.44, 2.5 0.59).
    assert np.abs(a - b).mean() > 0.25, np.abs(a - b).mean()
    assert "红色×2.5" in weighted.outputs["3"]["text"][0]


def test_every_node_and_input_has_a_chinese_locale_entry(client):
    info = client.object_info()
    zh = client.get_json("/i18n")["zh"]
    defs, categories = zh["nodeDefs"], zh["nodeCategories"]
    # the plugin's nodes, not core's Z-Image nodes (ZImageFunControlnet, TextEncodeZImageOmni, ...)
    ours = {name: node for name, node in info.items() if node.get("python_module") == "custom_nodes.comfyui-zimage"}
    assert len(ours) == 9
    for name, node in ours.items():
        entry = defs[name]
        assert entry["display_name"] and entry["description"], name
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        for input_name in inputs:
            assert entry["inputs"][input_name]["name"] and entry["inputs"][input_name]["tooltip"], (name, input_name)
        assert len(entry["outputs"]) == len(node["output"]), name
        for part in node["category"].split("/"):
            assert part in categories, (name, part)
    on_disk = json.loads((REPO_ROOT / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    assert set(on_disk) == set(ours)


def test_token_count_route_agrees_with_the_node_and_reports_the_cut(client):
    """The route the canvas counter calls runs the node's own tokenization, with no text encoder loaded."""
    text = "蓝色背景上的(红色:1.5)圆形，“福”字"
    result = client.run(graph(text, "count"), timeout=300)
    assert result.status == "success", result.error
    status, counted = client.post_json("/zimage/tokens", {"text": text})
    assert status == 200, counted
    assert result.outputs["3"]["text"][0].startswith(f"{counted['tokens']} tokens (max 512)")
    assert counted["spans"] == [{"text": "红色", "weight": 1.5}] and counted["quotes"] == ["福"]

    too_long = "红色圆形" * 400
    status, long = client.post_json("/zimage/tokens", {"text": too_long, "normalise": True})
    assert status == 200 and long["truncated"] and long["tokens"] == 512 < long["prompt_tokens"]
    assert long["cut_text"] and too_long.endswith(long["cut_text"]) and len(long["cut_text"]) < len(too_long)
    assert "longer than 512" in long["warning"]

    status, raw = client.post_json("/zimage/tokens", {"text": text, "template": "raw"})
    assert status == 200 and raw["tokens"] == counted["tokens"]  # the template's tokens are never counted

    for bad in ({"text": 5}, ["text"], {"text": "x", "template": "nope"}, {"text": "x", "template": []},
                {"text": "x", "normalise": "false"}):
        status, answer = client.post_json("/zimage/tokens", bad)
        assert status == 400 and answer["error"], bad
    status, answer = client.post_json("/zimage/tokens", {"text": "(" * 3000 + "红" + ")" * 3000})
    assert status == 400 and "multiply to" in answer["error"]  # the node's own refusal, at once
    status, capped = client.post_json("/zimage/tokens", {"text": "红色圆形" * 2000})
    assert status == 200 and capped["capped"] and capped["truncated"]
    assert client.system_stats()  # and the server keeps serving


def test_a_flood_of_worst_case_token_counts_is_answered_quickly_and_prompts_still_run(client):
    """40 concurrent counts of 4 000 unclosed brackets (each took 2.7 s of CPU with a quadratic parser): every one
    is answered, counted or told to come back, and a prompt queued meanwhile runs."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(pool.map(lambda i: client.post_json("/zimage/tokens", {"text": "(" * 4000 + str(i)}), range(40)))
        assert client.run(graph("白色背景上的三个黄色星形", "flood"), timeout=120).status == "success"
    assert {status for status, _ in answers} <= {200, 429}
    assert any(status == 200 for status, _ in answers)
    assert all("busy" in body["error"] for status, body in answers if status == 429)
    assert time.monotonic() - start < 60
