"""Z-Image Example Image: the package's own example pictures, so that a bundled workflow runs as it opens.

Core's Load Image reads only ComfyUI's input/ folder, where the edit workflow's pictures are not until someone
uploads them (Run then fails with "Invalid image file", and /prompt with HTTP 400). This node reads one of the
pictures that ship in the package's workflows/ folder instead, read-only, and writes nothing anywhere. It gives
the IMAGE and MASK core's Load Image gives for the same file (tests/unit/test_example_images.py compares them).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import comfy.model_management as mm
import node_helpers
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps, ImageSequence

from .shared import ZImageError

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "workflows"


class ExampleImageError(ZImageError):
    """A name that is not one of the package's example pictures."""


def example_names() -> list[str]:
    """The example pictures beside the bundled workflows (the workflows' thumbnails are .jpg, not listed)."""
    return sorted(p.name for p in EXAMPLES_DIR.glob("*.png") if p.is_file())


def refusal(name) -> str | None:
    names = example_names()
    if name in names:
        return None
    return (f"{str(name)[:200]!r} is not one of this package's example pictures ({', '.join(names)}). This node reads "
            "only those; for a picture of your own use core's Load Image.")


def example_path(name: str) -> Path:
    message = refusal(name)
    if message:
        raise ExampleImageError(message)
    return EXAMPLES_DIR / name  # a name from the folder's own listing: no path a client sends is ever opened


def load_like_load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Core LoadImage's conversion: frames of the first frame's size as [N, H, W, 3] RGB in 0..1; the mask is
    1 - alpha (1 where transparent), or a 64 x 64 zero mask for a picture without transparency."""
    img = node_helpers.pillow(Image.open, str(path))
    images, masks = [], []
    size = None
    for frame in ImageSequence.Iterator(img):
        frame = node_helpers.pillow(ImageOps.exif_transpose, frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        if size is None:
            size = rgb.size
        if rgb.size != size:
            continue
        images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None,])
        if "A" in frame.getbands():
            mask = 1.0 - torch.from_numpy(np.array(frame.getchannel("A")).astype(np.float32) / 255.0)
        elif frame.mode == "P" and "transparency" in frame.info:
            mask = 1.0 - torch.from_numpy(np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0)
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32, device="cpu")
        masks.append(mask.unsqueeze(0))
    image, mask = torch.cat(images, dim=0), torch.cat(masks, dim=0)
    # Newer core hands images on in its intermediate dtype and on its intermediate device; older core keeps them
    # float32 on the CPU.
    if hasattr(mm, "intermediate_dtype"):
        dtype, device = mm.intermediate_dtype(), mm.intermediate_device()
        image, mask = image.to(device=device, dtype=dtype), mask.to(device=device, dtype=dtype)
    return image, mask


class ZImageExampleImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageExampleImage",
            display_name="Z-Image Example Image",
            category="Z-Image/loaders",
            description="Loads one of the example pictures that ship with comfyui-zimage (its workflows/ folder), "
                        "read-only, so the bundled edit workflow runs without uploading anything. Gives the same IMAGE "
                        "and MASK as Load Image. For your own pictures use Load Image instead.",
            inputs=[
                io.Combo.Input("image", options=example_names(),
                               tooltip="An example picture from this package's workflows/ folder. "
                                       "zimage-edit-example.png: shapes to edit by instruction; "
                                       "zimage-inpaint-example.png: a picture with a transparent hole to inpaint."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The picture, RGB, as Load Image gives it."),
                io.Mask.Output(display_name="MASK",
                               tooltip="1 where the picture is transparent, 0 where it is opaque (as Load Image "
                                       "gives it; all 0 for a picture without transparency)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, image=None) -> bool | str:
        """A name outside the list is refused when the prompt is queued, with the list it must come from. (A linked
        input has no value yet at that point; execute refuses it then.)"""
        return True if image is None else refusal(image) or True

    @classmethod
    def fingerprint_inputs(cls, image):
        message = refusal(image)
        return message if message else hashlib.sha256(example_path(image).read_bytes()).hexdigest()

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        pixels, mask = load_like_load_image(example_path(image))
        return io.NodeOutput(pixels, mask)


NODES = [ZImageExampleImage]  # what this module adds to ComfyUI
