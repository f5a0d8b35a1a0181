"""Z-Image Example Image, in-process: the package's example pictures as core's Load Image gives them, read-only;
nothing but those pictures. (The bundled workflows that use it run without an upload: tests/unit/test_workflows.py.)"""
from __future__ import annotations

import os
import shutil

import folder_paths
import nodes as core_nodes  # ComfyUI's nodes.py (its folder is first on sys.path)
import pytest
import torch
from comfyui_zimage.nodes.example_images import EXAMPLES_DIR, ExampleImageError, ZImageExampleImage
from zimage_testing.helpers import REPO_ROOT

EXAMPLES = ["zimage-edit-example.png", "zimage-inpaint-example.png"]


def test_the_choices_are_the_example_pictures_beside_the_workflows():
    assert EXAMPLES_DIR == REPO_ROOT / "workflows"
    (image,) = ZImageExampleImage.define_schema().inputs
    assert image.options == EXAMPLES
    assert image.tooltip and all(o.tooltip for o in ZImageExampleImage.define_schema().outputs)


@pytest.fixture()
def input_dir(tmp_path):
    """Core's Load Image reads ComfyUI's input folder: a fresh one holding copies of the examples."""
    before = folder_paths.get_input_directory()
    for name in EXAMPLES:
        shutil.copyfile(EXAMPLES_DIR / name, tmp_path / name)
    folder_paths.set_input_directory(str(tmp_path))
    try:
        yield tmp_path
    finally:
        folder_paths.set_input_directory(before)


@pytest.mark.parametrize("name", EXAMPLES)
def test_image_and_mask_are_exactly_what_load_image_gives(input_dir, name):
    expected_image, expected_mask = core_nodes.LoadImage().load_image(name)
    image, mask = ZImageExampleImage.execute(name).result
    for got, want in ((image, expected_image), (mask, expected_mask)):
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)
        assert torch.equal(got, want)
    assert image.shape == (1, 128, 128, 3)
    if name == "zimage-inpaint-example.png":  # the transparent hole is 1 in the mask, the rest 0
        assert mask.shape == (1, 128, 128) and set(mask.unique().tolist()) == {0.0, 1.0}
        assert 0.05 < mask.mean().item() < 0.5
    else:  # no alpha channel: Load Image's 64 x 64 zero mask
        assert mask.shape == (1, 64, 64) and not mask.any()


@pytest.mark.parametrize("name", ["../README.md", "zimage-edit.jpg", "zimage-edit.json", str(EXAMPLES_DIR / EXAMPLES[0]),
                                  "api/../zimage-edit-example.png", "", "missing-example.png"])
def test_anything_else_is_refused_with_the_choices(name):
    message = ZImageExampleImage.validate_inputs(name)
    assert isinstance(message, str) and "example pictures" in message and all(e in message for e in EXAMPLES)
    with pytest.raises(ExampleImageError, match="Load Image"):
        ZImageExampleImage.execute(name)


def test_reading_writes_nothing(tmp_path):
    """Nothing under the package, nor in ComfyUI's input, output or temp folders, is created or changed."""
    def snapshot():
        seen = {}
        for root in (REPO_ROOT / "workflows", folder_paths.get_input_directory(), folder_paths.get_output_directory(),
                     folder_paths.get_temp_directory()):
            for dirpath, _, files in os.walk(root):
                for f in files:
                    st = os.stat(os.path.join(dirpath, f))
                    seen[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
        return seen

    before = snapshot()
    for name in EXAMPLES:
        ZImageExampleImage.execute(name)
        ZImageExampleImage.fingerprint_inputs(name)
    assert snapshot() == before
    assert ZImageExampleImage.fingerprint_inputs(EXAMPLES[0]) != ZImageExampleImage.fingerprint_inputs(EXAMPLES[1])
