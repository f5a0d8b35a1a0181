"""Synthetic scenes for the nano Z-Image family: simple shapes, captions in Chinese and English, edit pairs.

A scene is a plain dataclass; `render` draws it with PIL (2x supersampled, so edges are anti-aliased like a
photo's), `caption` words it in either language. Some attribute combinations are held out of training
(`is_held_out`) so the evaluation scores prompts the models never saw.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 128  # training resolution; everything below is in units of the image side (0..1)

OBJECT_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                  "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "blue": (40, 80, 220)}
PALETTE = {**OBJECT_COLOURS, **BACKGROUNDS}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "centre": (0.5, 0.5)}
# Objects span several 16-px DiT tokens (patch 2 of the 8x latent), so their shape is spatial, not sub-token.
RADII = {"small": 0.12, "medium": 0.155, "large": 0.19}

ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
      "white": "白色", "black": "黑色", "gray": "灰色",
      "circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形",
      "left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "centre": "中间",
      "small": "小", "large": "大", 1: "一个", 2: "两个", 3: "三个", 4: "四个"}
EN_COUNT = {1: "a", 2: "two", 3: "three", 4: "four"}
EN_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
EN_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
            "centre": "in the centre"}

# Where n objects of a group sit (before jitter).
GROUP_LAYOUTS = {2: [(0.28, 0.5), (0.72, 0.5)], 3: [(0.5, 0.27), (0.27, 0.72), (0.73, 0.72)],
                 4: [(0.28, 0.28), (0.72, 0.28), (0.28, 0.72), (0.72, 0.72)]}
GROUP_RADIUS = {2: 0.15, 3: 0.13, 4: 0.13}
EDIT_RADIUS, EDIT_JITTER = 0.11, 0.02
LABELS_LATIN = ("A", "OK", "Z", "7")
# Tiny bitmap glyphs, so Chinese labels render on any machine without a CJK font.
GLYPHS = {
    "中": ["...#...", "#######", "#..#..#", "#..#..#", "#######", "...#...", "...#..."],
    "大": ["...#...", "...#...", "#######", "...#...", "..#.#..", ".#...#.", "#.....#"],
    "文": ["...#...", "#######", ".#...#.", "..#.#..", "...#...", "..#.#..", "##...##"],
    "上": ["...#...", "...#...", "...####", "...#...", "...#...", "...#...", "#######"],
}


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    x: float
    y: float
    radius: float
    label: str = ""


@dataclass(frozen=True)
class Scene:
    background: str
    items: tuple[Item, ...]
    # What the caption says (a group of `count` same objects, optionally at `position`, of `size`).
    shape: str = ""
    colour: str = ""
    count: int = 1
    position: str = ""
    size: str = ""


def combo_key(shape, colour, background, count, position) -> str:
    return f"{shape}|{colour}|{background}|{count}|{position}"


def is_held_out(shape, colour, background, count, position) -> bool:
    """About 6% of attribute combinations never appear in training; the evaluation draws from them."""
    digest = hashlib.sha256(combo_key(shape, colour, background, count, position).encode()).digest()
    return digest[0] % 16 == 0


def random_group_scene(rng: random.Random, held_out: bool | None = False) -> Scene:
    """A background with `count` identical objects; a lone object also has a named position and size.

    held_out: False draws only training combinations, True only held-out ones, None any.
    """
    while True:
        background = rng.choice(list(BACKGROUNDS))
        colour = rng.choice([c for c in OBJECT_COLOURS if c != background])
        shape = rng.choice(SHAPES)
        count = rng.choice((1, 1, 2, 3, 4))
        position = rng.choice(list(POSITIONS)) if count == 1 else ""
        if held_out is None or is_held_out(shape, colour, background, count, position) == held_out:
            break
    jitter = 0.03
    if count == 1:
        size = rng.choice(list(RADII))
        radius = RADII[size] * rng.uniform(0.9, 1.1)
        cx, cy = POSITIONS[position]
        label = ""
        if size == "large" and shape in ("circle", "square") and rng.random() < 0.4:
            label = rng.choice(LABELS_LATIN + tuple(GLYPHS))
        items = (Item(shape, colour, cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter), radius, label),)
    else:
        size = ""
        radius = GROUP_RADIUS[count] * rng.uniform(0.9, 1.1)
        items = tuple(Item(shape, colour, x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter), radius)
                      for x, y in GROUP_LAYOUTS[count])
    return Scene(background, items, shape=shape, colour=colour, count=count, position=position, size=size)


def caption(scene: Scene, lang: str, rng: random.Random | None = None) -> str:
    """Words a group scene; `rng` picks among phrasings (None: the first, used for evaluation prompts)."""
    pick = (lambda options: options[0]) if rng is None else rng.choice
    s, c, n, bg = scene.shape, scene.colour, scene.count, scene.background
    label = scene.items[0].label if n == 1 else ""
    # Only a centred lone object goes unplaced in words (60 % of its captions), so a prompt without a place means one
    # object in the centre. Had every place gone unplaced, the prompt would mean a mix of five places, and turbo's
    # eight steps paint the mix's mean: a ragged blob.
    unplaced = n == 1 and scene.position == "centre" and rng is not None and rng.random() < 0.6
    if lang == "zh":
        size = ZH[scene.size] if scene.size in ("small", "large") and rng is not None and rng.random() < 0.5 else ""
        obj = f"{ZH[n]}{size}{ZH[c]}{ZH[s]}" if n > 1 or pick([False, True]) else f"{size}{ZH[c]}{ZH[s]}"
        if label:
            obj = f"写着“{label}”的{obj}"
        where = f"{ZH[scene.position]}的" if scene.position and not unplaced else ""
        # “蓝色背景上的红色圆形”: without a place the 的 still follows 背景上, as people write it
        return pick([f"{ZH[bg]}背景上{where or '的'}{obj}", f"{where}{obj}，{ZH[bg]}背景"])
    size = f"{scene.size} " if scene.size in ("small", "large") and rng is not None and rng.random() < 0.5 else ""
    noun = s if n == 1 else EN_PLURAL[s]
    obj = f"{EN_COUNT[n]} {size}{c} {noun}"
    if label:
        obj += f" with the text \"{label}\""
    where = f" {EN_WHERE[scene.position]}" if scene.position and not unplaced else ""
    return pick([f"{obj}{where} on a {bg} background", f"{bg} background, {obj}{where}"])


# ---------------------------------------------------------------------------------------------------
# Edit pairs: a few different shapes in a 3x3 grid of slots; one instruction changes one of them.

SLOTS = [0.2, 0.5, 0.8]
EDIT_KINDS = ("recolour", "move", "delete")  # the training data set stores a pair's kind as its index here
MOVES = {"left": (0, None), "right": (2, None), "top": (None, 0), "bottom": (None, 2)}
ZH_MOVE = {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方"}


@dataclass(frozen=True)
class EditPair:
    before: Scene
    after: Scene
    kind: str          # one of EDIT_KINDS
    target: Item       # the object as it was
    new_colour: str = ""
    direction: str = ""


def random_edit_pair(rng: random.Random) -> EditPair:
    while True:
        background = rng.choice(list(BACKGROUNDS))
        n = rng.choice((1, 2, 3))
        shapes = rng.sample(SHAPES, n)
        slots = rng.sample([(i, j) for i in range(3) for j in range(3)], n)
        colours = [rng.choice([c for c in OBJECT_COLOURS if c != background]) for _ in shapes]
        items = [Item(s, c, SLOTS[i] + rng.uniform(-EDIT_JITTER, EDIT_JITTER), SLOTS[j] + rng.uniform(-EDIT_JITTER, EDIT_JITTER),
                      EDIT_RADIUS * rng.uniform(0.9, 1.1)) for s, c, (i, j) in zip(shapes, colours, slots, strict=True)]
        k = rng.randrange(n)
        target, (ti, tj) = items[k], slots[k]
        kind = rng.choice(EDIT_KINDS)
        before = Scene(background, tuple(items))
        if kind == "recolour":
            new = rng.choice([c for c in OBJECT_COLOURS if c not in (background, target.colour)])
            after_items = list(items)
            after_items[k] = replace(target, colour=new)
            return EditPair(before, Scene(background, tuple(after_items)), kind, target, new_colour=new)
        if kind == "delete":
            return EditPair(before, Scene(background, tuple(items[:k] + items[k + 1:])), kind, target)
        direction = rng.choice(list(MOVES))
        col, row = MOVES[direction]
        dest = (ti if col is None else col, tj if row is None else row)
        if dest == (ti, tj) or dest in slots:
            continue
        after_items = list(items)
        after_items[k] = replace(target, x=SLOTS[dest[0]] + rng.uniform(-EDIT_JITTER, EDIT_JITTER),
                                 y=SLOTS[dest[1]] + rng.uniform(-EDIT_JITTER, EDIT_JITTER))
        return EditPair(before, Scene(background, tuple(after_items)), kind, target, direction=direction)


def edit_instruction(pair: EditPair, lang: str, rng: random.Random | None = None) -> str:
    pick = (lambda options: options[0]) if rng is None else rng.choice
    t = pair.target
    if lang == "zh":
        if pair.kind == "recolour":
            old, new = f"{ZH[t.colour]}{ZH[t.shape]}", ZH[pair.new_colour]
            return pick([f"把{old}改成{new}", f"将{old}变成{new}"])
        if pair.kind == "move":
            return pick([f"把{ZH[t.shape]}移到{ZH_MOVE[pair.direction]}", f"将{ZH[t.shape]}移动到{ZH_MOVE[pair.direction]}"])
        return pick([f"删除{ZH[t.shape]}", f"去掉{ZH[t.shape]}"])
    if pair.kind == "recolour":
        return pick([f"make the {t.colour} {t.shape} {pair.new_colour}", f"change the {t.colour} {t.shape} to {pair.new_colour}"])
    if pair.kind == "move":
        where = f"to the {pair.direction}"
        return pick([f"move the {t.shape} {where}", f"put the {t.shape} {where}"])
    return pick([f"remove the {t.shape}", f"delete the {t.shape}"])


# ---------------------------------------------------------------------------------------------------
# Rendering.

def shape_polygon(item: Item, side: float):
    cx, cy, r = item.x * side, item.y * side, item.radius * side
    if item.shape == "square":
        h = r * 0.9
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if item.shape == "triangle":
        return [(cx + r * 1.15 * math.cos(math.radians(a)), cy + r * 0.15 + r * 1.15 * math.sin(math.radians(a)))
                for a in (-90, 30, 150)]
    if item.shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.2 if k % 2 == 0 else r * 1.2 * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(item.shape)


def _label_colour(colour: str):
    return (20, 20, 20) if colour in ("yellow", "orange") else (245, 245, 245)


def _draw_label(draw: ImageDraw.ImageDraw, item: Item, side: float):
    cx, cy, r = item.x * side, item.y * side, item.radius * side
    fill = _label_colour(item.colour)
    if item.label in GLYPHS:
        rows = GLYPHS[item.label]
        cell = r * 0.9 / len(rows)
        x0, y0 = cx - cell * len(rows[0]) / 2, cy - cell * len(rows) / 2 + (r * 0.15 if item.shape == "triangle" else 0)
        for j, row in enumerate(rows):
            for i, ch in enumerate(row):
                if ch == "#":
                    draw.rectangle([x0 + i * cell, y0 + j * cell, x0 + (i + 1) * cell, y0 + (j + 1) * cell], fill=fill)
        return
    font = ImageFont.load_default(size=max(6, int(r * (0.9 if len(item.label) == 1 else 0.6))))
    draw.text((cx, cy + (r * 0.2 if item.shape == "triangle" else 0)), item.label, fill=fill, font=font, anchor="mm")


def _draw_shape(draw: ImageDraw.ImageDraw, item: Item, side: float, fill) -> None:
    if item.shape == "circle":
        r = item.radius * side
        draw.ellipse([item.x * side - r, item.y * side - r, item.x * side + r, item.y * side + r], fill=fill)
    else:
        draw.polygon(shape_polygon(item, side), fill=fill)


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    side = size * 2
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for item in scene.items:
        _draw_shape(draw, item, side, OBJECT_COLOURS[item.colour])
        if item.label:
            _draw_label(draw, item, side)
    return img.resize((size, size), Image.Resampling.BOX)


def render_object_masks(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Per item of `scene`, the fraction of each pixel it covers where no later item hides it (as in `render`; labels
    drawn on an object count as the object's): float32 (len(items), size, size)."""
    side = size * 2
    owner = Image.new("L", (side, side), 0)  # which item (1-based) is on top at each pixel
    draw = ImageDraw.Draw(owner)
    for k, item in enumerate(scene.items):
        _draw_shape(draw, item, side, k + 1)
    owner = np.asarray(owner)
    masks = (owner == np.arange(1, len(scene.items) + 1)[:, None, None]).astype(np.float32)
    return masks.reshape(-1, size, 2, size, 2).mean(axis=(2, 4))


def masks_by(scene: Scene, objects: np.ndarray, attribute: str) -> np.ndarray:
    """`render_object_masks`' per-item masks (any window of them) summed per kind of `attribute`: "shape" (the order
    of SHAPES) or "colour" (the order of OBJECT_COLOURS). One owner map serves both kinds."""
    kinds = SHAPES if attribute == "shape" else tuple(OBJECT_COLOURS)
    out = np.zeros((len(kinds), *objects.shape[1:]), dtype=np.float32)
    for item, mask in zip(scene.items, objects, strict=True):
        out[kinds.index(getattr(item, attribute))] += mask
    return out


def render_shape_masks(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Per shape kind (the order of SHAPES), the fraction of each pixel its objects cover: float32 (4, size, size)."""
    return masks_by(scene, render_object_masks(scene, size), "shape")


def render_colour_masks(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Per object colour (the order of OBJECT_COLOURS), the fraction of each pixel its objects cover: float32
    (6, size, size)."""
    return masks_by(scene, render_object_masks(scene, size), "colour")
