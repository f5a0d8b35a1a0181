"""The shipped nano family through a real ComfyUI server: the bundled workflows run and draw what they can.

The detector's scores of the current weights are in bench/RESULTS.md; these tests hold what the weights draw right
(colours, backgrounds, places, most shapes and counts, most edits), so a regression in it fails.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from zimage_testing.helpers import REPO_ROOT

from nano import detector
from zimage_client.submit import apply_options, of_type

WORKFLOWS = REPO_ROOT / "workflows" / "api"
pytestmark = pytest.mark.skipif(not (REPO_ROOT / "models" / "diffusion_models").is_dir(),
                                reason="the trained nano family is not in models/")


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"zimage-{name}.json").read_text())


def images_of(client, result, prompt: dict) -> list[Image.Image]:
    """The pictures of the workflow's SaveImage nodes (the k_gen report saves its plot as an output too)."""
    assert result.status == "success", result.error
    saves = {node_id for node_id, _ in of_type(prompt, ("SaveImage",))}
    return [Image.open(io.BytesIO(client.view(image))).convert("RGB")
            for node_id, output in result.outputs.items() if node_id in saves for image in output.get("images", [])]


def is_red_circle_on_blue(image: Image.Image) -> bool:
    """What the issue asks the detector to read: a red circle on blue, and nothing of another colour."""
    reading = detector.read(image)
    return (reading.background == "blue" and bool(reading.matching("circle", "red"))
            and all(b.colour == "red" for b in reading.objects))


@pytest.mark.parametrize("text", ["蓝色背景上的红色圆形", "a red circle on a blue background"])
def test_turbo_workflow_paints_a_red_circle_on_blue(client, text):
    prompt = apply_options(workflow("turbo"), text=text, seed=42)
    for _, node in of_type(prompt, ("EmptySD3LatentImage",)):
        node["inputs"]["batch_size"] = 4
    images = images_of(client, client.run(prompt, timeout=600), prompt)
    assert len(images) == 4 and images[0].size == (128, 128)
    good = [is_red_circle_on_blue(im) for im in images]
    assert sum(good) >= 3, [(r.background, [(b.colour, b.shape) for b in r.objects]) for r in map(detector.read, images)]


def test_edit_workflow_edits_by_instruction_and_inpaints_only_the_hole(client):
    prompt = workflow("edit")  # its pictures are the package's own (Z-Image Example Image): nothing to upload
    before = detector.read(Image.open(REPO_ROOT / "workflows" / "zimage-edit-example.png"))
    assert before.matching("circle", "red") and before.matching("square", "blue")
    result = client.run(prompt, timeout=600)
    assert result.status == "success", result.error
    saved = {img["filename"].split("_")[0]: Image.open(io.BytesIO(client.view(img))).convert("RGB") for img in result.images()}
    image = saved["zimage-edit"]
    after = detector.read(image)
    assert image.size == (128, 128) and after.background == "white", [(b.colour, b.shape) for b in after.objects]
    # “把红色圆形改成绿色”: the red circle turns green where it was
    green = after.matching("circle", "green")
    assert green and abs(green[0].x - 0.5) < 0.1 and abs(green[0].y - 0.5) < 0.1, [(b.colour, b.shape) for b in after.objects]
    assert not after.matching("circle", "red")
    blue = after.matching(colour="blue")  # the object the instruction does not name stays where it was
    assert blue and abs(blue[0].x - 0.2) < 0.1 and abs(blue[0].y - 0.2) < 0.1

    # Masked inpainting: the upload's transparent pixels are repainted, every other pixel is kept exactly.
    upload = Image.open(REPO_ROOT / "workflows" / "zimage-inpaint-example.png")
    alpha = np.asarray(upload)[..., 3]
    original = np.asarray(upload.convert("RGB")).astype(int)
    painted = np.asarray(saved["zimage-inpaint"]).astype(int)
    assert (painted[alpha == 255] == original[alpha == 255]).all()
    assert np.abs(painted[alpha == 0] - original[alpha == 0]).mean() > 20
    assert not detector.read(saved["zimage-inpaint"]).matching("circle", "red")


def test_base_workflow_runs_with_cfg_and_a_negative_prompt(client):
    prompt = workflow("base")
    sampler = of_type(prompt, ("KSampler",))[0][1]
    assert prompt[sampler["inputs"]["negative"][0]]["inputs"]["text"] == "模糊，变形" and sampler["inputs"]["cfg"] == ["1", 4]
    (image,) = images_of(client, client.run(prompt, timeout=600), prompt)
    reading = detector.read(image)
    stars = reading.matching("star", "yellow")  # the workflow's prompt: 白色背景上的三个黄色星形
    assert reading.background == "white" and len(stars) == 3, [(b.colour, b.shape) for b in reading.objects]


def test_main_job_writes_the_turbo_image(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "zimage_client.main_job", "--output-dir", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (png,) = sorted(out.glob("*zimage-turbo*.png"))
    assert is_red_circle_on_blue(Image.open(png).convert("RGB"))
