"""The bundled workflows as files: each UI workflow has its API twin, thumbnail and menu entry, uses this
package's nodes, keeps the pruning patch one keystroke away, says how to switch to the real files, gives every
node a title of its own, and quotes only the steps and cfg the loader recommends. (Each twin running on a fresh
server: tests/server/test_workflows_server.py; each twin being exactly the frontend's export, and each workflow
running from the canvas: tests/browser/test_browser.py.)"""
from __future__ import annotations

import re

import pytest
from comfyui_zimage.nodes.checkpoint_format import SAMPLING_SETTINGS
from zimage_testing.helpers import WORKFLOW_MENU, WORKFLOWS_DIR, api_workflow, model_variant, ui_workflow, workflow_names

WORKFLOWS = WORKFLOWS_DIR
NAMES = workflow_names()
BYPASSED = 4  # LiteGraph's node mode
ZIMAGE_NODES = {"ZImageCheckpointLoader", "ZImageChineseTextEncode", "ZImageKGenProbe", "ZImageKGenReport",
                "ZImageEntropyPrunedAttention"}


def test_every_workflow_has_its_api_twin_thumbnail_and_menu_entry():
    assert NAMES == sorted(["zimage-turbo", "zimage-base", "zimage-edit", "zimage-turbo-speed-test",
                            "zimage-base-quality-benchmark"])
    assert sorted(WORKFLOW_MENU) == NAMES
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == NAMES
    for name in NAMES:
        assert (WORKFLOWS / f"{name}.jpg").stat().st_size > 1000, name


@pytest.mark.parametrize("name", NAMES)
def test_workflow_uses_the_package_nodes_and_explains_the_real_files(name):
    nodes = ui_workflow(name)["nodes"]
    types = {n["type"] for n in nodes}
    assert ZIMAGE_NODES <= types, ZIMAGE_NODES - types
    assert {"ZImageTiledVAEDecode"} <= types
    pruning = [n for n in nodes if n["type"] == "ZImageEntropyPrunedAttention"]
    assert pruning and all(n["mode"] == BYPASSED for n in pruning)  # present, off, Ctrl+B to switch on
    notes = " ".join(n["widgets_values"][0] for n in nodes if n["type"] in ("Note", "MarkdownNote"))
    for needed in ("models/diffusion_models/z_image_turbo_bf16.safetensors", "models/text_encoders/qwen_3_4b.safetensors",
                   "models/vae/ae.safetensors", "Ctrl+B"):
        assert needed in notes, (name, needed)
    twin = api_workflow(name)
    assert "ZImageEntropyPrunedAttention" not in {n["class_type"] for n in twin.values()}  # bypassed: not sent
    assert {n["class_type"] for n in twin.values()} <= {n["type"] for n in nodes}


def test_turbo_and_base_follow_their_variants_settings():
    turbo, base = api_workflow("zimage-turbo"), api_workflow("zimage-base")
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
    twin = api_workflow("zimage-edit")
    types = [n["class_type"] for n in twin.values()]
    assert types.count("ReferenceLatent") == 2 and "SetLatentNoiseMask" in types and "ImageCompositeMasked" in types
    # Its pictures are the package's own, read where they ship: nothing to upload before it runs.
    images = {n["inputs"]["image"] for n in twin.values() if n["class_type"] == "ZImageExampleImage"}
    assert images == {"zimage-edit-example.png", "zimage-inpaint-example.png"}
    assert all((WORKFLOWS / image).is_file() for image in images)
    notes = " ".join(n["widgets_values"][0] for n in ui_workflow("zimage-edit")["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    assert "**Load Image**" in notes  # how to use a picture of one's own


@pytest.mark.parametrize("name", NAMES)
def test_no_workflow_needs_a_file_in_comfyuis_input_folder(name):
    assert not {"LoadImage", "LoadImageMask", "LoadImageOutput"} & {n["type"] for n in ui_workflow(name)["nodes"]}


def test_benchmark_workflows_are_wired_to_the_probe():
    for name, label in (("zimage-turbo-speed-test", "turbo-speed-test"),
                        ("zimage-base-quality-benchmark", "base-quality-benchmark")):
        twin = api_workflow(name)
        (probe,) = [n for n in twin.values() if n["class_type"] == "ZImageKGenProbe"]
        (sampler,) = [n for n in twin.values() if n["class_type"] == "KSampler"]
        assert probe["inputs"]["label"] == label and twin[sampler["inputs"]["model"][0]] is probe
        (report,) = [n for n in twin.values() if n["class_type"] == "ZImageKGenReport"]
        assert report["inputs"]["save_history"] is True and report["inputs"]["prompt_stats"][0] in twin
    quality = api_workflow("zimage-base-quality-benchmark")
    (sampler,) = [n for n in quality.values() if n["class_type"] == "KSampler"]
    assert sampler["inputs"]["steps"] == 30
    assert next(n for n in quality.values() if n["class_type"] == "ZImageKGenReport")["inputs"]["image_space"] is True


# ---------------------------------------------------------------------------------------------------
# Titles: unique and telling within each workflow; the edit workflow's say which group they belong to.

EDIT_GROUPS = {"Edit: ": "Instruction editing", "Inpaint: ": "Masked inpainting"}


def core_names(name: str) -> set[str]:
    """What a node would be called without a title of its own: its class, as ComfyUI's nodes name it."""
    types = {n["type"] for n in ui_workflow(name)["nodes"]}
    return types | {t.replace("ZImage", "Z-Image ") for t in types}


@pytest.mark.parametrize("name", NAMES)
def test_every_node_has_a_title_of_its_own_unique_in_its_workflow(name):
    nodes = ui_workflow(name)["nodes"]
    # The canvas saves a title only when it is not the node type's own name, so each node here was given one.
    titles = {str(n["id"]): n.get("title") for n in nodes}
    assert all(titles.values()), [n["type"] for n in nodes if not n.get("title")]
    assert len(set(titles.values())) == len(titles), sorted(titles.values())
    assert not set(titles.values()) & core_names(name)
    twin = api_workflow(name)
    assert {i: n["_meta"]["title"] for i, n in twin.items()} == {i: titles[i] for i in twin}  # the API twin agrees
    if name != "zimage-edit":  # one group, no prefix: nothing a client could take for a "Group: " prefix
        assert not [t for t in titles.values() if ": " in t], titles


def test_every_edit_workflow_title_names_its_group():
    workflow, twin = ui_workflow("zimage-edit"), api_workflow("zimage-edit")
    groups = {g["title"].split(" (")[0]: g["bounding"] for g in workflow["groups"]}
    assert set(groups) == set(EDIT_GROUPS.values())
    for node in workflow["nodes"]:
        (prefix,) = [p for p in EDIT_GROUPS if node["title"].startswith(p)] or [None]
        assert prefix and len(node["title"]) > len(prefix) and ": " not in node["title"][len(prefix):], node["title"]
        x, y, w, h = groups[EDIT_GROUPS[prefix]]  # and the node sits in that group
        assert x <= node["pos"][0] < x + w and y <= node["pos"][1] < y + h, (node["title"], node["pos"], (x, y, w, h))
    # Each group is a graph of its own: no link crosses from one prefix to the other.
    for node in twin.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                source = twin[value[0]]["_meta"]["title"]
                assert source.split(": ")[0] == node["_meta"]["title"].split(": ")[0], (source, node["_meta"]["title"])


# ---------------------------------------------------------------------------------------------------
# Figures the menu and the notes quote: the loader's recommended settings for the workflow's models.

FIGURE = re.compile(r"(?P<steps>\d+)[ -](?:steps?|NFEs?)(?:,? (?:at )?cfg (?P<paired_cfg>\d+(?:\.\d+)?))?"
                    r"|cfg (?P<cfg>\d+(?:\.\d+)?)")


def variants(name: str) -> set[str]:
    return {model_variant(n["inputs"]["model"]) for n in api_workflow(name).values()
            if n["class_type"] == "ZImageCheckpointLoader"}


def claims(text: str) -> list[tuple[int | None, float | None]]:
    """(steps, cfg) figures in a text: "9 steps, cfg 1" is one claim; "30 steps" and "cfg 4" alone are too.
    (Every ComfyUI sampler step the workflows use is one model evaluation, so "N NFE" counts as N steps.)"""
    out = []
    for m in FIGURE.finditer(text):
        steps = int(m["steps"]) if m["steps"] else None
        cfg = m["paired_cfg"] or m["cfg"]
        out.append((steps, float(cfg) if cfg else None))
    return out


def holds(claim: tuple[int | None, float | None], settings: list[dict]) -> bool:
    steps, cfg = claim
    return any((steps is None or s["steps"] == steps) and (cfg is None or s["cfg"] == cfg) for s in settings)


@pytest.mark.parametrize("name", NAMES)
def test_menu_label_and_notes_quote_the_loaders_settings(name):
    settings = [SAMPLING_SETTINGS[v] for v in sorted(variants(name))]
    notes = [n["widgets_values"][0] for n in ui_workflow(name)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    for text in (WORKFLOW_MENU[name], *notes):
        for claim in claims(text):
            assert holds(claim, settings), (name, claim, text[:120], settings)
    # A sampler whose steps are not wired from the loader runs what the notes say it runs.
    for node in api_workflow(name).values():
        if node["class_type"] == "KSampler" and not isinstance(node["inputs"]["steps"], list):
            assert node["inputs"]["steps"] in {steps for steps, _ in claims(" ".join(notes))}, name


def test_the_text_to_image_labels_quote_steps_and_cfg():
    """The checks above are not vacuous: the labels users choose from say what the workflow runs."""
    for name in ("zimage-turbo", "zimage-base"):
        (only,) = variants(name)
        settings = SAMPLING_SETTINGS[only]
        assert claims(WORKFLOW_MENU[name]) == [(settings["steps"], settings["cfg"])], WORKFLOW_MENU[name]


def test_the_figure_reader_catches_a_drifted_claim():
    turbo = [SAMPLING_SETTINGS["turbo"]]
    assert not holds(claims("Turbo: text to image (8 steps, cfg 1)")[0], turbo)
    assert not holds(claims("distilled to 8 steps at cfg 1")[0], turbo)
    assert not holds(claims("8 NFE at cfg 1")[0], turbo)
    assert holds(claims("Turbo: text to image (9 steps, cfg 1)")[0], turbo)
