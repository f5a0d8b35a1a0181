"""The shipped nano family through a real ComfyUI server: the bundled workflows run and draw what they can.

The current weights get colours and backgrounds right but not yet shapes, counts and edits (issue 3's bar:
see bench/RESULTS.md); these tests hold the part that is met, so a regression in it fails.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nano import detector
from zimage_client.submit import apply_options, of_type, upload_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows" / "api"
pytestmark = pytest.mark.skipif(not (REPO_ROOT / "models" / "diffusion_models").is_dir(),
                                reason="the trained nano family is not in models/")


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"zimage-{name}.json").read_text())


def images_of(client, result) -> list[Image.Image]:
    assert result.status == "success", result.error
    return [Image.open(io.BytesIO(client.view(image))).convert("RGB") for image in result.images()]


def is_red_on_blue(image: Image.Image) -> bool:
    reading = detector.read(image)
    return reading.background == "blue" and bool(reading.objects) and all(b.colour == "red" for b in reading.objects)


@pytest.mark.parametrize("text", ["蓝色背景上的红色圆形", "a red circle on a blue background"])
def test_turbo_workflow_paints_red_on_blue(client, text):
    prompt = apply_options(workflow("turbo"), text=text, seed=42)
    for _, node in of_type(prompt, ("EmptySD3LatentImage",)):
        node["inputs"]["batch_size"] = 4
    images = images_of(client, client.run(prompt, timeout=600))
    assert len(images) == 4 and images[0].size == (128, 128)
    good = [is_red_on_blue(im) for im in images]
    assert sum(good) >= 3, [(r.background, [(b.colour, b.shape) for b in r.objects]) for r in map(detector.read, images)]


def test_edit_workflow_runs_on_the_uploaded_image_and_keeps_the_scene(client):
    prompt = workflow("edit")
    upload_inputs(client, prompt, WORKFLOWS / "zimage-edit.json")
    before = detector.read(Image.open(REPO_ROOT / "workflows" / "zimage-edit-example.png"))
    assert before.matching("circle", "red") and before.matching("square", "blue")
    (image,) = images_of(client, client.run(prompt, timeout=600))
    after = detector.read(image)
    assert image.size == (128, 128) and after.background == "white", [(b.colour, b.shape) for b in after.objects]
    blue = after.matching(colour="blue")  # the object the instruction does not name stays where it was
    assert blue and abs(blue[0].x - 0.2) < 0.1 and abs(blue[0].y - 0.2) < 0.1


def test_base_workflow_runs_with_cfg_and_a_negative_prompt(client):
    prompt = workflow("base")
    assert of_type(prompt, ("CLIPTextEncode",))[1][1]["inputs"]["text"] == ""
    (image,) = images_of(client, client.run(prompt, timeout=600))
    reading = detector.read(image)
    assert reading.background == "white" and reading.matching(colour="yellow")


def test_main_job_writes_the_turbo_image(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "zimage_client.main_job", "--output-dir", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (png,) = sorted(out.glob("*zimage-turbo*.png"))
    assert is_red_on_blue(Image.open(png).convert("RGB"))
