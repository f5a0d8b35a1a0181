"""A deterministic reader of shape scenes: colour segmentation, then shape and position tests.

It scores generated images against what a prompt asked for (`score_prompt`) and edits against their
instruction (`score_edit`). Pure numpy/scipy/PIL; it reads the renders of `scenes.py` perfectly, which
tests/unit/test_nano_scenes.py checks, so its errors on generated images are the models' errors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .scenes import MOVES, OBJECT_COLOURS, PALETTE, SLOTS, EditPair, Scene

NAMES = list(PALETTE)
COLOURS = np.array([PALETTE[n] for n in NAMES], dtype=np.float32)
UNKNOWN = -1
# Mean absolute pixel change (0..1) allowed outside the edited object; the VAE round trip alone is ~0.01.
EDIT_OUTSIDE_THRESHOLD = 0.04


@dataclass
class Blob:
    colour: str
    shape: str
    x: float  # centroid, fraction of width
    y: float
    area: float  # fraction of the image
    bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 in pixels


@dataclass
class Reading:
    background: str
    objects: list[Blob]

    def matching(self, shape=None, colour=None) -> list[Blob]:
        return [b for b in self.objects if (shape is None or b.shape == shape) and (colour is None or b.colour == colour)]


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    d = ((rgb[:, :, None, :] - COLOURS[None, None]) ** 2).sum(-1)
    cls = d.argmin(-1)
    cls[d.min(-1) > 60.0 ** 2] = UNKNOWN  # blends at edges and noise belong to nothing
    return cls


def shape_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / float(h * w)
    try:
        pts = np.stack([np.concatenate([xs, xs + 1, xs, xs + 1]), np.concatenate([ys, ys, ys + 1, ys + 1])], 1)
        solidity = mask.sum() / ConvexHull(pts).volume
    except QhullError:
        return "unknown"
    if solidity < 0.78:
        return "star"
    if fill >= 0.86:
        return "square"
    if fill >= 0.66:
        return "circle"
    return "triangle"


def read(image: Image.Image | np.ndarray) -> Reading:
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    side = rgb.shape[0]
    cls = classify_pixels(rgb)
    border = np.concatenate([cls[0], cls[-1], cls[:, 0], cls[:, -1]])
    border = border[border != UNKNOWN]
    bg_index = int(np.bincount(border, minlength=len(NAMES)).argmax()) if border.size else NAMES.index("white")
    min_area = 0.004 * rgb.shape[0] * rgb.shape[1]
    objects = []
    for index, name in enumerate(NAMES):
        if index == bg_index or name not in OBJECT_COLOURS:
            continue
        mask = ndimage.binary_opening(cls == index, iterations=1)
        labels, n = ndimage.label(mask)
        for k in range(1, n + 1):
            comp = ndimage.binary_fill_holes(labels == k)  # text drawn on an object leaves holes
            if comp.sum() < min_area:
                continue
            ys, xs = np.nonzero(comp)
            bbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
            objects.append(Blob(name, shape_of(comp), float(xs.mean() + 0.5) / side, float(ys.mean() + 0.5) / side,
                                float(comp.sum()) / comp.size, bbox))
    return Reading(NAMES[bg_index], objects)


def region_of(x: float, y: float) -> str:
    if abs(x - 0.5) <= 0.12 and abs(y - 0.5) <= 0.12:
        return "centre"
    if abs(x - 0.5) >= abs(y - 0.5):
        return "left" if x < 0.5 else "right"
    return "top" if y < 0.5 else "bottom"


def score_prompt(scene: Scene, image) -> dict[str, bool]:
    """Attribute -> right? for a group scene's prompt: the named shape's colour, its count, its position."""
    reading = read(image)
    named = reading.matching(scene.shape, scene.colour)
    result = {"colour": bool(named), "count": len(named) == scene.count}
    if scene.position:
        result["position"] = len(named) >= 1 and region_of(named[0].x, named[0].y) == scene.position
    return result


def slot_of(x: float, y: float) -> tuple[int, int]:
    return int(np.abs(np.array(SLOTS) - x).argmin()), int(np.abs(np.array(SLOTS) - y).argmin())


def score_edit(pair: EditPair, before_image, after_image) -> dict[str, object]:
    """Did the named attribute change as asked, and did the rest of the picture stay put?"""
    t = pair.target
    reading = read(after_image)
    same_place = [b for b in reading.matching(t.shape) if slot_of(b.x, b.y) == slot_of(t.x, t.y)]
    if pair.kind == "recolour":
        changed = any(b.colour == pair.new_colour for b in same_place) and not any(b.colour == t.colour for b in same_place)
        where = [(t.x, t.y)]
    elif pair.kind == "delete":
        changed = not reading.matching(t.shape, t.colour)
        where = [(t.x, t.y)]
    else:
        col, row = MOVES[pair.direction]
        start = slot_of(t.x, t.y)
        dest = (start[0] if col is None else col, start[1] if row is None else row)
        moved = [b for b in reading.matching(t.shape, t.colour) if slot_of(b.x, b.y) == dest]
        changed = bool(moved) and not same_place
        where = [(t.x, t.y), (SLOTS[dest[0]], SLOTS[dest[1]])]
    a = np.asarray(before_image.convert("RGB"), dtype=np.float32) / 255.0
    b = np.asarray(after_image.convert("RGB"), dtype=np.float32) / 255.0
    side = a.shape[0]
    outside = np.ones(a.shape[:2], dtype=bool)
    half = int(round((t.radius * 1.2 + 0.06) * side))  # the object and a margin for its blur
    for x, y in where:
        cx, cy = int(x * side), int(y * side)
        outside[max(0, cy - half):cy + half, max(0, cx - half):cx + half] = False
    change = float(np.abs(a - b).mean(-1)[outside].mean()) if outside.any() else 0.0
    # every object the instruction does not name is still read, same shape and colour, in its slot: a recoloured
    # neighbour moves the mean pixel change outside the edited object by only about 0.015, under the threshold
    others_kept = all(any(slot_of(b.x, b.y) == slot_of(o.x, o.y) for b in reading.matching(o.shape, o.colour))
                      for o in pair.before.items if o != t)
    return {"changed": changed, "outside_change": change, "others_kept": others_kept,
            "ok": changed and others_kept and change < EDIT_OUTSIDE_THRESHOLD}

