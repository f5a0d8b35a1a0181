"""The bundled workflows on a fresh server: each API twin is accepted and runs as it is, with nothing uploaded, and
the template browser's route lists and serves the workflows. (The files themselves: tests/unit/test_workflows.py.)"""
from __future__ import annotations

import json

import pytest
from comfyui_zimage.nodes.checkpoint_format import SAMPLING_SETTINGS
from zimage_testing.helpers import REPO_ROOT, api_workflow, planned_steps, ui_workflow, workflow_names

from zimage_client.server import ComfyServer

NAMES = workflow_names()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A ComfyUI that has never seen an upload: its input folder is new and empty."""
    with ComfyServer(tmp_path_factory.mktemp("fresh-comfyui"), cpu=True) as server:
        yield server


def input_files(server) -> list:
    """The files in a server's input folder (newer core creates an empty input/3d/ as it starts)."""
    return sorted(p for p in server.dir("input").rglob("*") if p.is_file())


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_on_a_fresh_server_without_any_upload(fresh, name):
    client = fresh.client()
    assert input_files(fresh) == []
    prompt = api_workflow(name)
    result = client.run(prompt, timeout=900)
    assert result.status == "success", result.error
    assert input_files(fresh) == []  # nothing was needed there, and nothing was put there
    for node_id, node in prompt.items():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            assert result.outputs[node_id]["images"], (name, node_id)
        if node["class_type"] == "ZImageKGenReport":  # one model evaluation per step, as the claims count them
            report = json.loads(result.outputs[node_id]["json"][0])
            sampler = prompt[node["inputs"]["samples"][0]]
            assert report["nfe"] == planned_steps(prompt, sampler, SAMPLING_SETTINGS), (name, report["nfe"])


def test_an_example_picture_outside_the_list_is_refused_when_queued(fresh):
    # The instruction-editing group alone (with the other group, ComfyUI would queue that one and drop this).
    prompt = {i: n for i, n in api_workflow("zimage-edit").items() if n["_meta"]["title"].startswith("Edit: ")}
    (node,) = [n for n in prompt.values() if n["class_type"] == "ZImageExampleImage"]
    node["inputs"]["image"] = "../README.md"
    status, body = fresh.client().post_json("/prompt", {"prompt": prompt})
    assert status == 400, body
    assert "zimage-edit-example.png" in json.dumps(body) and "Load Image" in json.dumps(body)


def test_the_template_route_lists_every_workflow_and_serves_it(fresh):
    """The template browser reads /workflow_templates (package folder -> workflow names) and fetches each one and
    its thumbnail under /api/workflow_templates/<package>/."""
    client = fresh.client()
    package = REPO_ROOT.name if REPO_ROOT.parent.name == "custom_nodes" else "comfyui-zimage"
    listed = client.get_json("/workflow_templates")
    assert sorted(listed[package]) == NAMES  # the API twins in workflows/api/ are not templates
    for name in NAMES:
        served = json.loads(client.get_bytes(f"/api/workflow_templates/{package}/{name}.json"))
        assert served == ui_workflow(name)
        assert client.get_bytes(f"/api/workflow_templates/{package}/{name}.jpg")[:3] == b"\xff\xd8\xff"
