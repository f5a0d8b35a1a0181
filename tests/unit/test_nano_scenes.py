"""The synthetic scenes, their captions and the detector that scores the nano family (no model involved)."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from nano import detector, scenes


def test_detector_reads_every_rendered_scene_right():
    rng = random.Random(0)
    for _ in range(300):
        scene = scenes.random_group_scene(rng, held_out=None)
        image = scenes.render(scene)
        assert all(detector.score_prompt(scene, image).values()), scene
        assert detector.read(image).background == scene.background


def test_detector_scores_a_wrong_image_wrong():
    red_circle = scenes.Scene("blue", (scenes.Item("circle", "red", 0.5, 0.5, 0.12),), "circle", "red", 1, "centre")
    green_square_left = scenes.Scene("blue", (scenes.Item("square", "green", 0.25, 0.5, 0.12),), "square", "green", 1, "left")
    result = detector.score_prompt(red_circle, scenes.render(green_square_left))
    assert result == {"colour": False, "count": False, "position": False}
    two = scenes.Scene("white", tuple(scenes.Item("star", "yellow", x, 0.5, 0.1) for x in (0.3, 0.7)), "star", "yellow", 3)
    assert detector.score_prompt(two, scenes.render(two)) == {"colour": True, "count": False}
    blank = Image.new("RGB", (128, 128), scenes.BACKGROUNDS["gray"])
    assert detector.read(blank).objects == [] and detector.read(blank).background == "gray"


@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_detector_tells_shapes_apart_at_every_size(shape):
    for radius in (0.07, 0.1, 0.14):
        scene = scenes.Scene("black", (scenes.Item(shape, "orange", 0.5, 0.5, radius),))
        assert [b.shape for b in detector.read(scenes.render(scene)).objects] == [shape]


def test_shape_masks_cover_each_object_under_its_own_kind_and_hide_what_is_covered():
    square = scenes.Item("square", "red", 0.4, 0.5, 0.15)
    circle_on_top = scenes.Item("circle", "blue", 0.6, 0.5, 0.15)
    scene = scenes.Scene("white", (square, circle_on_top))
    masks = scenes.render_shape_masks(scene)
    assert masks.shape == (len(scenes.SHAPES), scenes.SIZE, scenes.SIZE)
    circle_px, square_px = masks[scenes.SHAPES.index("circle")].sum(), masks[scenes.SHAPES.index("square")].sum()
    r = 0.15 * scenes.SIZE
    assert abs(circle_px - np.pi * r * r) < 0.05 * np.pi * r * r  # the circle lies whole on top (PIL draws it a little large)
    assert 0.5 * (1.8 * r) ** 2 < square_px < 0.9 * (1.8 * r) ** 2  # the square partly hidden under it
    assert masks[2:].sum() == 0 and masks.sum(axis=0).max() <= 1.0
    # where the rendered image shows the object's colour, its mask is full
    image = np.asarray(scenes.render(scene)).astype(int)
    blue = (np.abs(image - scenes.OBJECT_COLOURS["blue"]).sum(axis=2) < 10)
    assert masks[scenes.SHAPES.index("circle")][blue].min() > 0.9


def test_colour_masks_cover_each_object_under_its_colour():
    star, circle = scenes.Item("star", "orange", 0.3, 0.5, 0.15, "A"), scenes.Item("circle", "yellow", 0.7, 0.5, 0.15)
    scene = scenes.Scene("blue", (star, circle))
    masks = scenes.render_colour_masks(scene)
    colours = list(scenes.OBJECT_COLOURS)
    shapes = scenes.render_shape_masks(scene)
    assert masks.shape == (6, scenes.SIZE, scenes.SIZE)
    assert np.allclose(masks[colours.index("orange")], shapes[scenes.SHAPES.index("star")])  # the label counts as the star
    assert np.allclose(masks[colours.index("yellow")], shapes[scenes.SHAPES.index("circle")])
    assert masks[colours.index("blue")].sum() == 0  # the background is no object


def test_edits_scored_right_only_when_the_named_thing_changed_and_nothing_else():
    rng = random.Random(1)
    for _ in range(150):
        pair = scenes.random_edit_pair(rng)
        before, after = scenes.render(pair.before), scenes.render(pair.after)
        assert detector.score_edit(pair, before, after)["ok"], pair
        assert not detector.score_edit(pair, before, before)["changed"], pair  # no edit at all
    pair = scenes.random_edit_pair(random.Random(3))
    noisy = np.asarray(scenes.render(pair.after), dtype=np.int16) + np.random.default_rng(0).integers(-40, 40, (128, 128, 3))
    result = detector.score_edit(pair, scenes.render(pair.before), Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    assert result["outside_change"] > detector.EDIT_OUTSIDE_THRESHOLD and not result["ok"]
    # the named object edited right, but a neighbour recoloured too: wrong, though the pixels outside barely moved
    pair = next(p for p in iter(lambda: scenes.random_edit_pair(rng), None) if p.kind == "recolour"
                and any(o.colour != p.new_colour for o in p.before.items if o != p.target))
    other = next(o for o in pair.before.items if o != pair.target and o.colour != pair.new_colour)
    spoilt = replace(pair.after, items=tuple(replace(o, colour=pair.new_colour) if o == other else o for o in pair.after.items))
    result = detector.score_edit(pair, scenes.render(pair.before), scenes.render(spoilt))
    assert result["changed"] and result["outside_change"] < detector.EDIT_OUTSIDE_THRESHOLD
    assert not result["others_kept"] and not result["ok"]


def test_captions_name_the_attributes_in_both_languages():
    scene = scenes.Scene("blue", (scenes.Item("circle", "red", 0.5, 0.5, 0.1),), "circle", "red", 1, "centre")
    assert scenes.caption(scene, "zh") == "蓝色背景上中间的红色圆形"
    assert scenes.caption(scene, "en") == "a red circle in the centre on a blue background"
    rng = random.Random(2)
    for _ in range(200):
        s = scenes.random_group_scene(rng)
        zh, en = scenes.caption(s, "zh", rng), scenes.caption(s, "en", rng)
        assert scenes.ZH[s.colour] in zh and scenes.ZH[s.shape] in zh and scenes.ZH[s.background] in zh
        assert s.colour in en and s.shape in en and s.background in en
        if s.count > 1:
            assert scenes.ZH[s.count] in zh and scenes.EN_COUNT[s.count] in en


def test_only_centred_lone_objects_go_unplaced_in_training_captions_and_none_in_held_out_prompts():
    rng = random.Random(3)
    lone = [s for s in (scenes.random_group_scene(rng) for _ in range(1500)) if s.count == 1 and s.position]

    def placed(s, lang):
        text = scenes.caption(s, lang, rng)
        return (scenes.EN_WHERE if lang == "en" else scenes.ZH)[s.position] in text

    for lang in ("zh", "en"):
        centred = [placed(s, lang) for s in lone if s.position == "centre"]
        assert len(centred) > 100 and 0.25 < sum(centred) / len(centred) < 0.55, lang  # 60 % go without a place
        # elsewhere the place is always said, so a prompt without one means the centre, not a mix of five places
        assert all(placed(s, lang) for s in lone if s.position != "centre"), lang
    assert all(scenes.ZH[s.position] in scenes.caption(s, "zh") for s in lone)  # the evaluation always names it
    scene = scenes.Scene("blue", (scenes.Item("circle", "red", 0.5, 0.5, 0.1),), "circle", "red", 1, "centre")
    seen = {scenes.caption(scene, "zh", random.Random(k)) for k in range(200)}
    assert "蓝色背景上的红色圆形" in seen  # the main job's and the server test's prompt, word for word


def test_held_out_combinations_never_reach_training():
    rng = random.Random(4)
    train = {(s.shape, s.colour, s.background, s.count, s.position) for s in
             (scenes.random_group_scene(rng, held_out=False) for _ in range(3000))}
    held = {(s.shape, s.colour, s.background, s.count, s.position) for s in
            (scenes.random_group_scene(rng, held_out=True) for _ in range(300))}
    assert held and not (train & held)
    assert all(scenes.is_held_out(*k) for k in held)


def test_edit_instructions():
    pair = scenes.EditPair(scenes.Scene("white", ()), scenes.Scene("white", ()), "recolour",
                           scenes.Item("circle", "red", 0.5, 0.5, 0.1), new_colour="green")
    assert scenes.edit_instruction(pair, "zh") == "把红色圆形改成绿色"
    assert scenes.edit_instruction(pair, "en") == "make the red circle green"
    move = scenes.EditPair(pair.before, pair.after, "move", scenes.Item("square", "blue", 0.5, 0.5, 0.1), direction="left")
    assert scenes.edit_instruction(move, "en") == "move the square to the left"
    delete = scenes.EditPair(pair.before, pair.after, "delete", scenes.Item("triangle", "blue", 0.5, 0.5, 0.1))
    assert scenes.edit_instruction(delete, "zh") == "删除三角形"
