"""The bundled workflows and the web extension in a real browser (Debian chromium driven by playwright-core)
against the real ComfyUI frontend served by the real server.

Each workflow is opened from the Z-Image menu, must load with no missing-node, missing-model or validation
dialog, must export (the frontend's own graph-to-prompt) exactly its API twin in workflows/api/, and must run
on the nano models and show its images; the token counter and the k_gen figures are read off the page. The same
holds in Vue nodes mode (Nodes 2.0); with the zh locale the plugin's nodes carry their Chinese names on the
canvas; only the plugin's own nodes take its colour. Every check reads what the page does (feature detection),
never a frontend version, so the suite runs on old and new frontends alike.
Screenshots go to test-artifacts/browser/. `python3 install.py test` installs chromium and playwright-core.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from zimage_testing.helpers import REPO_ROOT, WORKFLOW_MENU

BROWSER_DIR = REPO_ROOT / "tests" / "browser"
ARTEFACTS = REPO_ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WORKFLOWS = WORKFLOW_MENU  # name -> label in the Z-Image menu (test_workflows.py checks it against the folder)
PLUGIN_NODES = ("ZImageCheckpointLoader", "ZImageTiledVAEDecode", "ZImageTiledVAEEncode", "ZImageEntropyPrunedAttention",
                "ZImagePruningReport", "ZImageKGenProbe", "ZImageKGenReport", "ZImageChineseTextEncode", "ZImageExampleImage")
COLOURS = {"#1f3a4d", "#29506a"}  # web/appearance.js: color, bgcolor
BGCOLOR = "#29506a"

missing = [what for what, ok in (("node", shutil.which("node")), (CHROMIUM, Path(CHROMIUM).exists()),
                                 ("playwright-core", (BROWSER_DIR / "node_modules" / "playwright-core").is_dir())) if not ok]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"browser tests need {', '.join(missing)}: run `python3 install.py test`")


def scenario(which: str, **params) -> dict:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    # Its own process group, so that a timeout stops chromium too, not only node.
    proc = subprocess.Popen(["node", str(BROWSER_DIR / "scenarios.mjs"), which], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=BROWSER_DIR, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(json.dumps(dict(params, out=str(ARTEFACTS))), timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"browser scenario {which} timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"browser scenario {which} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def object_info(client):
    return client.object_info()


@pytest.fixture(scope="module")
def other_nodes(object_info) -> list[str]:
    """Nodes that are not the plugin's but could pass for it: core's own "ZImage..." nodes (ZImageFunControlnet on
    ComfyUI 0.33+), KSampler, and another package's custom node (ComfyUI's bundled websocket_image_save)."""
    module = object_info["ZImageCheckpointLoader"]["python_module"]
    assert {n for n, d in object_info.items() if d.get("python_module") == module} == set(PLUGIN_NODES)
    others = [n for n, d in object_info.items() if n.startswith("ZImage") and d.get("python_module") != module]
    others += [n for n in ("KSampler", "SaveImageWebsocket") if n in object_info]
    assert "KSampler" in others
    return others


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_bundled_workflow_loads_exports_its_api_twin_runs_and_shows_its_images(server, name):
    result = scenario("workflow", url=server.url, name=name, label=WORKFLOWS[name])
    assert result["loadDialogs"] == [], result["loadDialogs"]
    assert result["tab"] == f"{name}.json" or result["tab"] == name
    twin = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
    assert result["exported"] == twin, f"workflows/api/{name}.json differs from the frontend's export of workflows/{name}.json"
    assert result["run"]["status"] == "success", result["run"]
    assert result["afterDialogs"] == [] and result["problems"] == [], (result["afterDialogs"], result["problems"])

    saved = {n["id"]: n for n in result["images"]}
    outputs = [i for i, n in twin.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
    batch = next((n["inputs"]["batch_size"] for n in twin.values() if n["class_type"] == "EmptySD3LatentImage"), 1)
    assert outputs
    for node_id in outputs:
        shown = saved[node_id]["images"]
        assert len(shown) == batch and all(img["width"] == 128 and img["height"] == 128 for img in shown), shown
    reports = [n for n in twin.values() if n["class_type"] == "ZImageKGenReport"]
    assert len(result["figures"]) == len(reports) >= 1
    for figures in result["figures"]:
        assert figures["visible"] and "k_gen =" in figures["text"] and float(figures["kGen"]) > 0, figures
    report_ids = [i for i, n in twin.items() if n["class_type"] == "ZImageKGenReport"]
    assert all(saved[i]["images"][0]["width"] > 500 for i in report_ids)  # the plot, drawn in the node
    assert (ARTEFACTS / f"{name}.png").stat().st_size > 10_000


def test_token_counter_follows_typing_and_warns_over_the_limit(server, client):
    short, long = "蓝色背景上的(红色:1.5)圆形", "红色圆形" * 400
    result = scenario("tokenCount", url=server.url, label=WORKFLOWS["zimage-turbo"], short=short, long=long)
    expected = {text: client.post_json("/zimage/tokens", {"text": text})[1] for text in ("蓝色背景上的红色圆形", short, long)}

    assert result["initial"]["tokens"] == str(expected["蓝色背景上的红色圆形"]["tokens"]), result["initial"]
    assert result["typed"]["visible"] and result["typed"]["tokens"] == str(expected[short]["tokens"])
    assert result["typed"]["text"].startswith(f"{expected[short]['tokens']} / 512 tokens") and not result["typed"]["over"]
    assert result["over"]["over"] and "over the limit" in result["over"]["text"]
    assert int(result["over"]["tokens"]) == expected[long]["prompt_tokens"] > 512
    assert expected[long]["truncated"]
    # The counter is the extension's own: it is never saved into the workflow or sent with the prompt.
    assert "token_count" not in result["exportedInputs"] and result["serialisedText"] == len(long)
    assert result["problems"] == []


def test_bundled_workflows_are_in_the_template_browser_with_thumbnails(server):
    result = scenario("templates", url=server.url, packageName=REPO_ROOT.name if (REPO_ROOT.parent.name == "custom_nodes")
                      else "comfyui-zimage", expected=len(WORKFLOWS))
    names = {card["name"]: card for card in result["cards"]}  # newer frontends show badges ("Node graph") too
    assert set(WORKFLOWS) <= set(names), names
    # In the Z-Image menu's order, turbo first (web/workflows.js orders the list the frontend reads).
    assert [card["name"] for card in result["cards"] if card["name"] in WORKFLOWS] == list(WORKFLOWS), result["cards"]
    for name in WORKFLOWS:
        assert all(img["loaded"] for img in names[name]["images"]), names[name]
        assert (REPO_ROOT / "workflows" / f"{name}.jpg").is_file()
    assert result["problems"] == []


def test_only_the_plugins_own_nodes_take_its_colour(server, other_nodes):
    result = scenario("freshNodes", url=server.url, types=[*PLUGIN_NODES, *other_nodes], shot="node-colours")
    nodes = {n["type"]: n for n in result["nodes"]}
    assert set(nodes) == set(PLUGIN_NODES) | set(other_nodes), nodes
    for name in PLUGIN_NODES:
        assert {nodes[name]["color"], nodes[name]["bgcolor"]} == COLOURS, nodes[name]
    for name in other_nodes:  # core's ZImageFunControlnet shares the name prefix, not the package
        assert nodes[name]["color"] not in COLOURS and nodes[name]["bgcolor"] not in COLOURS, nodes[name]
    assert result["problems"] == []


def test_vue_nodes_mode_renders_the_plugins_nodes_and_runs_a_workflow(server, other_nodes):
    name = "zimage-turbo"
    result = scenario("vueNodes", url=server.url, name=name, label=WORKFLOWS[name], fresh=[*PLUGIN_NODES, *other_nodes],
                      settings={"Comfy.VueNodes.Enabled": True})
    assert result["vueNodes"] is True
    assert result["loadDialogs"] == [], result["loadDialogs"]
    twin = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
    assert result["exported"] == twin

    # Every node is a DOM node on screen with its title; the plugin's are painted in its colour, with their widgets.
    nodes = {n["id"]: n for n in result["nodes"]}
    assert set(twin) <= set(nodes)
    for node in nodes.values():
        assert node["dom"] and node["domVisible"] and node["domTitle"] == node["title"], node
    plugin = [n for n in nodes.values() if n["type"] in PLUGIN_NODES]
    # (the bypassed Entropy-Pruned Attention is in the graph, not in the export)
    assert {n["type"] for n in plugin} >= {n["class_type"] for n in twin.values() if n["class_type"] in PLUGIN_NODES}
    for node in plugin:
        assert node["domBackground"] == BGCOLOR and node["domWidgets"] > 0, node
    assert [n for n in nodes.values() if n["type"] == "KSampler"][0]["domBackground"] != BGCOLOR
    encoder = next(i for i, n in twin.items() if n["class_type"] == "ZImageChineseTextEncode")
    assert result["counter"]["visible"] and result["counter"]["inNode"] == encoder, result["counter"]
    assert result["counter"]["text"].endswith("/ 512 tokens") and int(result["counter"]["tokens"]) > 0

    assert result["run"]["status"] == "success", result["run"]
    assert result["afterDialogs"] == [] and result["problems"] == [], (result["afterDialogs"], result["problems"])
    shown = {n["id"]: n["images"] for n in result["images"]}
    save = next(i for i, n in twin.items() if n["class_type"] in ("SaveImage", "PreviewImage"))
    report = next(i for i, n in twin.items() if n["class_type"] == "ZImageKGenReport")
    assert [(img["width"], img["height"]) for img in shown[save]] == [(128, 128)], shown
    assert shown[report] and shown[report][0]["width"] > 500, shown  # the plot, in the node's DOM
    assert [f["inNode"] for f in result["figures"]] == [report]
    assert all(f["visible"] and "k_gen =" in f["text"] and float(f["kGen"]) > 0 for f in result["figures"]), result["figures"]

    # New nodes: the plugin's in its colour, the others (core's ZImageFunControlnet among them on 0.33) not.
    fresh = {n["type"]: n for n in result["freshNodes"]}
    assert set(fresh) == set(PLUGIN_NODES) | set(other_nodes)
    for node in fresh.values():
        assert node["dom"] and node["domTitle"] == node["title"], node
        assert (node["domBackground"] == BGCOLOR) == (node["type"] in PLUGIN_NODES), node
    assert (ARTEFACTS / f"vue-nodes-{name}-run.png").stat().st_size > 10_000


@pytest.mark.parametrize("mode", ["canvas", "vue"])
def test_zh_locale_shows_the_plugins_chinese_node_names_on_the_canvas(server, client, object_info, mode):
    zh = json.loads((REPO_ROOT / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    expected = {name: zh[name]["display_name"] for name in PLUGIN_NODES}
    served = client.get_json("/i18n")["zh"]["nodeDefs"]
    assert {name: served[name]["display_name"] for name in PLUGIN_NODES} == expected  # the server's side is right
    english = {name: object_info[name]["display_name"] for name in (*PLUGIN_NODES, "KSampler")}
    assert all(expected[name] != english[name] for name in PLUGIN_NODES)

    result = scenario("freshNodes", url=server.url, types=[*PLUGIN_NODES, "KSampler"], shot=f"zh-node-titles-{mode}",
                      settings={"Comfy.Locale": "zh", "Comfy.VueNodes.Enabled": mode == "vue"})
    assert result["frontend"]["locale"] == "zh" and result["problems"] == [], result
    nodes = {n["type"]: n for n in result["nodes"]}
    titles = {name: nodes[name]["title"] for name in PLUGIN_NODES}  # what the canvas draws
    if mode == "vue":  # and what the DOM shows
        assert all(nodes[name]["dom"] and nodes[name]["domTitle"] == nodes[name]["title"] for name in nodes), nodes
    # The locale took effect: core's nodes are in Chinese.
    assert nodes["KSampler"]["title"] != english["KSampler"], nodes["KSampler"]
    if titles != expected and titles == {name: english[name] for name in PLUGIN_NODES}:
        reason = (f"frontend {result['frontend']['version']} shows core nodes in Chinese (KSampler: "
                  f"{nodes['KSampler']['title']}) but the plugin's nodes under their English names, although /i18n "
                  "serves locales/zh/nodeDefs.json: this frontend does not apply custom nodes' translated display names "
                  "to node titles (likely the upstream frontend bug fixed in Dec 2025)")
        print(reason)
        pytest.skip(reason)
    assert titles == expected
