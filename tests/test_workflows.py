"""The bundled workflows as files: each UI workflow has its API twin, thumbnail and menu entry, uses this
package's nodes, keeps the pruning patch one keystroke away, and says how to switch to the real files.
(That each twin is exactly the frontend's export, and that each runs, is tests/test_browser.py.)"""
from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT, WORKFLOW_MENU

WORKFLOWS = REPO_ROOT / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
BYPASSED = 4  # LiteGraph's node mode
ZIMAGE_NODES = {"ZImageCheckpointLoader", "ZImageChineseTextEncode", "ZImageKGenProbe", "ZImageKGenReport",
                "ZImageEntropyPrunedAttention"}


def ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))


def test_every_workflow_has_its_api_twin_thumbnail_and_menu_entry():
    assert NAMES == sorted(["zimage-turbo", "zimage-base", "zimage-edit", "zimage-turbo-speed-test",
                            "zimage-base-quality-benchmark"])
    assert sorted(WORKFLOW_MENU) == NAMES
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == NAMES
    for name in NAMES:
        assert (WORKFLOWS / f"{name}.jpg").stat().st_size > 1000, name


@pytest.mark.parametrize("name", NAMES)
def test_workflow_uses_the_package_nodes_and_explains_the_real_files(name):
    nodes = ui(name)["nodes"]
    types = {n["type"] for n in nodes}
    assert ZIMAGE_NODES <= types, ZIMAGE_NODES - types
    assert {"ZImageTiledVAEDecode"} <= types
    pruning = [n for n in nodes if n["type"] == "ZImageEntropyPrunedAttention"]
    assert pruning and all(n["mode"] == BYPASSED for n in pruning)  # present, off, Ctrl+B to switch on
    notes = " ".join(n["widgets_values"][0] for n in nodes if n["type"] in ("Note", "MarkdownNote"))
    for needed in ("models/diffusion_models/z_image_turbo_bf16.safetensors", "models/text_encoders/qwen_3_4b.safetensors",
                   "models/vae/ae.safetensors", "Ctrl+B"):
        assert needed in notes, (name, needed)
    twin = api(name)
    assert "ZImageEntropyPrunedAttention" not in {n["class_type"] for n in twin.values()}  # bypassed: not sent
    assert {n["class_type"] for n in twin.values()} <= {n["type"] for n in nodes}


def test_turbo_and_base_follow_their_variants_settings():
    turbo, base = api("zimage-turbo"), api("zimage-base")
    for twin, variant in ((turbo, "turbo"), (base, "base")):
        (sampler,) = [n for n in twin.values() if n["class_type"] == "KSampler"]
        loader = twin[sampler["inputs"]["cfg"][0]]
        assert loader["class_type"] == "ZImageCheckpointLoader" and variant in loader["inputs"]["model"]
        assert sampler["inputs"]["steps"] == [sampler["inputs"]["cfg"][0], 3]  # steps and cfg come from the variant
    (sampler,) = [n for n in base.values() if n["class_type"] == "KSampler"]
    assert base[sampler["inputs"]["negative"][0]]["class_type"] == "ZImageChineseTextEncode"
    (sampler,) = [n for n in turbo.values() if n["class_type"] == "KSampler"]
    assert turbo[sampler["inputs"]["negative"][0]]["class_type"] == "ConditioningZeroOut"


def test_edit_workflow_has_instruction_editing_and_masked_inpainting():
    twin = api("zimage-edit")
    types = [n["class_type"] for n in twin.values()]
    assert types.count("ReferenceLatent") == 2 and "SetLatentNoiseMask" in types and "ImageCompositeMasked" in types
    images = {n["inputs"]["image"] for n in twin.values() if n["class_type"] == "LoadImage"}
    assert images == {"zimage-edit-example.png", "zimage-inpaint-example.png"}
    assert all((WORKFLOWS / image).is_file() for image in images)


def test_benchmark_workflows_are_wired_to_the_probe():
    for name, label in (("zimage-turbo-speed-test", "turbo-speed-test"),
                        ("zimage-base-quality-benchmark", "base-quality-benchmark")):
        twin = api(name)
        (probe,) = [n for n in twin.values() if n["class_type"] == "ZImageKGenProbe"]
        (sampler,) = [n for n in twin.values() if n["class_type"] == "KSampler"]
        assert probe["inputs"]["label"] == label and twin[sampler["inputs"]["model"][0]] is probe
        (report,) = [n for n in twin.values() if n["class_type"] == "ZImageKGenReport"]
        assert report["inputs"]["save_history"] is True and report["inputs"]["prompt_stats"][0] in twin
    quality = api("zimage-base-quality-benchmark")
    (sampler,) = [n for n in quality.values() if n["class_type"] == "KSampler"]
    assert sampler["inputs"]["steps"] == 30
    assert next(n for n in quality.values() if n["class_type"] == "ZImageKGenReport")["inputs"]["image_space"] is True
