"""The bundled workflows and the web extension in a real browser (Debian chromium driven by playwright-core)
against the real ComfyUI frontend served by the real server.

Each workflow is opened from the Z-Image menu, must load with no missing-node, missing-model or validation
dialog, must export (the frontend's own graph-to-prompt) exactly its API twin in workflows/api/, and must run
on the nano models and show its images; the token counter and the k_gen figures are read off the page.
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
from conftest import REPO_ROOT, WORKFLOW_MENU

BROWSER_DIR = REPO_ROOT / "tests" / "browser"
ARTEFACTS = REPO_ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WORKFLOWS = WORKFLOW_MENU  # name -> label in the Z-Image menu (test_workflows.py checks it against the folder)

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
def uploaded(client):
    """The edit workflow's pictures, uploaded as a user uploads them (they ship beside the workflows)."""
    for name in ("zimage-edit-example.png", "zimage-inpaint-example.png"):
        client.upload_image(name, (REPO_ROOT / "workflows" / name).read_bytes())


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_bundled_workflow_loads_exports_its_api_twin_runs_and_shows_its_images(server, uploaded, name):
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
                      else "comfyui-zimage")
    names = {card["text"].split("\n")[0]: card for card in result["cards"]}
    assert set(WORKFLOWS) <= set(names), names
    for name in WORKFLOWS:
        assert all(img["loaded"] for img in names[name]["images"]), names[name]
        assert (REPO_ROOT / "workflows" / f"{name}.jpg").is_file()
    assert result["problems"] == []
