"""The training script end to end on a few samples, its resume, and the shipped weights' budget."""
from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfyui_zimage.nodes.checkpoint_format import (
    detect_variant,
    infer_dit_config,
    infer_qwen3_config,
    infer_vae_config,
    read_header,
)
from safetensors.torch import load_file
from zimage_testing.helpers import REPO_ROOT

SHIPPED = REPO_ROOT / "models"


def shapes(path: Path) -> dict:
    return {k: v.shape for k, v in read_header(path).tensors.items()}


def digest(folder: Path) -> dict:
    """File -> hash of its tensors (the metadata holds the run's duration, which differs)."""
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        h = hashlib.sha256()
        for name, tensor in sorted(load_file(str(path)).items()):
            h.update(name.encode() + tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else name.encode())
        out[str(path.relative_to(folder))] = h.hexdigest()
    return out


def train(out: Path, work: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "nano.train", "--quick", "--out", str(out), "--work", str(work)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.live  # a training run in another process (about a minute)
def test_quick_training_writes_a_loadable_family_and_resumes(tmp_path):
    out, work = tmp_path / "models", tmp_path / "work"
    log = train(out, work)
    report = json.loads(log.strip().splitlines()[-1])
    assert report["quick"] and set(report["final_loss"]) == {"vae", "vae-decoder", "vae-decoder-whole", "base", "turbo", "edit"}
    assert "data" in report["stage_minutes"]  # building the data set counts towards the training's minutes
    assert (out / "training-loss.png").stat().st_size > 0 and (out / "training-report.json").exists()
    for variant in ("base", "turbo", "edit"):
        path = out / "diffusion_models" / f"nano_zimage_{variant}.safetensors"
        header = read_header(path)
        config = infer_dit_config(shapes(path), path.name, header.metadata)
        assert config["dim"] == 256 and config["axes_dims"] == [16, 24, 24]
        assert detect_variant(path.name, header.metadata)[0] == variant
    te = out / "text_encoders" / "nano_qwen3.safetensors"
    assert infer_qwen3_config(shapes(te), te.name)["hidden_size"] == 32
    assert infer_vae_config(shapes(out / "vae" / "nano_ae.safetensors"), "vae")["z_channels"] == 16
    data = load_file(str(work / "data.safetensors"))  # the edit stage draws its pairs by kind and object count
    assert data["edit_kind"].shape == (24,) and set(data["edit_kind"].tolist()) <= {0, 1, 2}
    assert data["edit_objects"].shape == (24,) and set(data["edit_objects"].tolist()) <= {1, 2, 3}
    first = digest(out)
    # A second run finds every stage finished in its checkpoints, resumes, and re-exports the same weights.
    again = train(out, work)
    assert "resuming at step 3/3" in again
    assert digest(out) == first
    # The folder records its plan: the full plan refuses to resume the quick run's checkpoints, before any work.
    other = subprocess.run([sys.executable, "-m", "nano.train", "--cpu", "--out", str(out), "--work", str(work)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "holds checkpoints of another plan" in other.stderr
    assert digest(out) == first


def test_a_work_folder_from_before_plan_records_is_refused(tmp_path):
    from nano.plan import Plan
    from nano.stage import claim_work_folder

    (tmp_path / "vae.ckpt.safetensors").write_bytes(b"")
    assert "older recipe" in claim_work_folder(tmp_path, Plan())
    fresh = tmp_path / "fresh"
    assert claim_work_folder(fresh, Plan()) is None and claim_work_folder(fresh, Plan()) is None
    assert "another plan" in claim_work_folder(fresh, Plan.quick())


@pytest.mark.skipif(not (SHIPPED / "diffusion_models").is_dir(), reason="the trained nano family is not in models/")
def test_shipped_family_fits_the_budget_and_keeps_unused_rows_zero():
    files = sorted(SHIPPED.rglob("*.safetensors"))
    assert {p.name for p in files} >= {"nano_zimage_base.safetensors", "nano_zimage_turbo.safetensors",
                                       "nano_zimage_edit.safetensors", "nano_qwen3.safetensors", "nano_ae.safetensors"}
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    table = load_file(str(SHIPPED / "text_encoders" / "nano_qwen3.safetensors"))["model.embed_tokens.weight"]
    used = (table != 0).any(dim=1)
    assert 100 < int(used.sum()) < 5000 and not bool(used[151669:].any())
    assert table.dtype == torch.float16


def test_a_time_budget_fixes_the_step_count_once_timed_and_a_resume_keeps_it(tmp_path):
    import time

    from nano.plan import Plan
    from nano.stage import Stage, make_optimizer

    plan = Plan.gpu(minutes=10)
    stages = ("vae", "vae-decoder", "vae-decoder-whole", "base", "turbo", "edit")
    assert sum(plan.stage_minutes(s) for s in stages) == pytest.approx(10)
    model = torch.nn.Linear(2, 2)

    def stage():
        return Stage("budget", tmp_path, {"m": model}, make_optimizer([{"params": model.parameters()}]), steps=10_000,
                     lr=1e-3, minutes=2.0 / 60)

    calls = []

    def step_fn(step):
        calls.append(step)
        time.sleep(0.02)  # at least 20 ms a step: 2 s hold at most 100 steps, however slow the machine
        return 0.0

    state = stage().run(step_fn)
    assert Stage.UNTIMED + Stage.TIMED < state["steps"] <= 100 and state["step"] == state["steps"] == len(calls)
    resumed = stage()
    assert resumed.steps == state["steps"]
    resumed.run(step_fn)
    assert len(calls) == state["steps"]  # nothing left to do
    # stopped inside the timing window, before the count was fixed: the resumed run times its own steps
    (tmp_path / "budget.ckpt.safetensors").unlink()
    cut = stage()
    cut.state["step"] = 25
    state = cut.run(step_fn)
    assert 25 + Stage.TIMED < state["steps"] <= 100


def test_the_ema_warms_up_so_a_short_run_keeps_none_of_the_initial_weights():
    from nano.stage import EMA

    model = torch.nn.Linear(4, 4)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.add_(1.0)  # training moved the weights; a plain 0.999 would still hold 82% of the old ones
    for step in range(200):
        ema.update(step)
    assert torch.allclose(ema.state()["weight"], model.weight, atol=1e-3)


def test_degraded_latents_blur_noise_or_blur_only_the_colour_channels_and_keep_the_rest():
    from nano.latents import SHAPE_CODES, degrade_latents

    z = torch.randn(256, 16, 8, 8)
    out = degrade_latents(z, torch.Generator().manual_seed(0))
    same = [(out[i] == z[i]).all().item() for i in range(256)]
    assert 64 < sum(same) < 128  # about 3/8 untouched (half not degraded, three quarters of them not colour-blurred)
    codes_kept = [(out[i, SHAPE_CODES] == z[i, SHAPE_CODES]).all().item() and not same[i] for i in range(256)]
    assert 32 < sum(codes_kept) < 100  # a quarter: colour channels blurred, the shape codes exactly as encoded
    changed = out[[not s for s in same]] - z[[not s for s in same]]
    assert changed.abs().mean() > 0.05


def test_shape_code_targets_say_the_kind_loudly_even_where_an_object_barely_reaches():
    from nano.latents import SHAPE_CODE_SCALE, shape_code_targets

    masks = torch.zeros(1, 4, 16, 16)
    masks[0, 3, :8, :8] = 1.0        # a star fills block (0, 0)
    masks[0, 3, :1, 8:16] = 1.0      # and its tip covers an eighth of block (0, 1)
    masks[0, 0, 8:9, 8:9] = 1.0      # a circle grazes 1/64 of block (1, 1)
    target = shape_code_targets(masks)
    assert target.shape == (1, 4, 2, 2)
    assert target[0, 3, 0, 0] == SHAPE_CODE_SCALE and target[0, 3, 0, 1] == SHAPE_CODE_SCALE * 0.5
    assert 0 < target[0, 0, 1, 1] < 0.2 and target[0, 3, 1, 1] == 0


def test_colour_code_targets_give_every_object_colour_its_own_direction():
    from nano import scenes
    from nano.latents import COLOUR_CODES, SHAPE_CODE_SCALE, colour_code_targets

    codes = {}
    for colour in scenes.OBJECT_COLOURS:
        scene = scenes.Scene("white", (scenes.Item("square", colour, 0.5, 0.5, 0.3),))
        target = colour_code_targets(torch.from_numpy(scenes.render_colour_masks(scene))[None])
        assert target.shape == (1, COLOUR_CODES.stop - COLOUR_CODES.start, 16, 16)
        assert target[0, :, 0, 0].abs().sum() == 0  # the background's corner block says nothing
        codes[colour] = target[0, :, 8, 8]  # a block the square covers whole
        assert codes[colour].norm() == pytest.approx(SHAPE_CODE_SCALE)
    names = list(codes)
    gaps = [float((codes[a] - codes[b]).norm()) for i, a in enumerate(names) for b in names[i + 1:]]
    assert min(gaps) == pytest.approx(SHAPE_CODE_SCALE * 2 ** 0.5)  # orange and yellow as far apart as any pair


def test_crop_pairs_cut_latents_and_pictures_to_the_same_window():
    from nano.latents import crop_pairs

    x = torch.arange(2 * 3 * 128 * 128, dtype=torch.float32).view(2, 3, 128, 128)
    z = torch.nn.functional.avg_pool2d(x, 8)  # a stand-in latent whose every pixel is its block's mean
    zc, xc = crop_pairs(z, x, 8, random.Random(3))
    assert zc.shape == (2, 3, 8, 8) and xc.shape == (2, 3, 64, 64)
    assert torch.equal(torch.nn.functional.avg_pool2d(xc, 8), zc)


def test_edit_region_weights_put_the_focus_on_what_the_edit_changed():
    from nano.latents import LATENT_SCALE, edit_region_weights

    before = torch.zeros(2, 16, 16, 16)
    after = before.clone()
    after[0, 3, 5, 5] = 3.0 / LATENT_SCALE   # an object recoloured in one block
    after[1] += 0.5 / LATENT_SCALE            # the encoder's small global shift: not an edit
    w = edit_region_weights(before, after, focus=8.0)
    assert w.shape == (2, 1, 16, 16) and torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2))
    assert w[0, 0, 4:7, 4:7].min() > w[0, 0, 0, 0] * 8  # the changed block and its neighbours weigh 9x the rest
    assert torch.allclose(w[1], torch.ones(1, 16, 16))  # nothing changed enough: the plain loss

    before[0, 7, 12, 12] = after[0, 7, 12, 12] = 3.0 / LATENT_SCALE  # a neighbour the edit leaves alone
    alone, kept = edit_region_weights(before, after, 8.0), edit_region_weights(before, after, 8.0, objects=True)
    assert alone[0, 0, 12, 12] == alone[0, 0, 0, 0]  # the edit's focus only: the neighbour weighs as the background
    assert kept[0, 0, 11:14, 11:14].min() > kept[0, 0, 0, 0] * 8  # with `objects`, as much as the edit
    assert torch.isclose(kept[0, 0, 5, 5], kept[0, 0, 12, 12]) and torch.allclose(kept.mean(dim=(1, 2, 3)), torch.ones(2))


def test_edge_weights_weigh_up_only_the_outlines():
    from nano.data import images_to_tensor
    from nano.latents import edge_weights
    from nano.scenes import Item, Scene, render

    x = images_to_tensor([render(Scene("white", (Item("star", "red", 0.5, 0.5, 0.2),)))])
    w = edge_weights(x, 4.0)
    assert w.shape == (1, 1, 128, 128) and set(torch.unique(w).tolist()) == {1.0, 5.0}
    assert w[0, 0, 0, 0] == 1.0 and w[0, 0, 64, 64] == 1.0  # the background and the star's middle: plain
    ring = w[0, 0] > 1
    assert 0.02 < ring.float().mean() < 0.3  # a thin band, not the whole object
    assert torch.equal(edge_weights(torch.zeros(1, 3, 16, 16), 4.0), torch.ones(1, 1, 16, 16))  # no outline, no weight


def test_fat_footprints_widen_the_colours_and_keep_the_shape_codes():
    from nano.latents import SHAPE_CODES, fat_footprints

    z = torch.zeros(64, 16, 16, 16)
    z[:, :, 6:10, 6:10] = 1.0  # an object: colour and code channels over the same 4x4 blocks
    degraded = torch.full_like(z, 7.0)
    out = fat_footprints(z, degraded, torch.Generator().manual_seed(0), share=0.5)
    widened = out[:, 0, 0, 0] != 7.0
    assert 10 < int(widened.sum()) < 54  # about half the batch, the rest passed through
    assert torch.equal(out[~widened], degraded[~widened])
    w = out[widened]
    assert torch.equal(w[:, SHAPE_CODES], z[widened][:, SHAPE_CODES])  # the codes keep the exact outline
    assert (w[:, 0, 5, 7] > 0).all() and (w[:, 0, 0, 0] == 0).all()  # the colour spreads one block past it, not far
    assert torch.equal(fat_footprints(z, degraded, torch.Generator().manual_seed(0), share=0.0), degraded)


def test_batches_keep_one_width_and_padding_a_caption_further_changes_nothing():
    from nano.data import Batches
    from nano.models import encode_text, make_dit, make_text_encoder
    from nano.plan import Plan

    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(6, 26, (64,), generator=gen, dtype=torch.int32)
    ids = torch.randint(0, 300, (64, 25), generator=gen, dtype=torch.int32)
    data = {"zh.ids": ids, "zh.len": lens, "en.ids": ids, "en.len": lens,
            "empty.ids": ids[:1, :8], "empty.len": torch.tensor([8], dtype=torch.int32)}
    batches = Batches(data, "", Plan())
    picks = [batches.pick(step, 1, 16) for step in range(20)]
    # one shape for every step, so a compiled model never recompiles
    assert {tuple(p[1].shape) for p in picks} == {(16, 25)}
    # the DiT's output for a caption is the same whether the batch pads it to 25 tokens or to its own length
    te, dit = make_text_encoder(3, list(range(300))), make_dit(4)
    with torch.no_grad():  # a trained model's output layer, not adaLN-Zero's zeros
        for p in dit.final_layer.parameters():
            p.normal_(0, 0.1, generator=gen)
    n = 13
    short, padded = ids[:1, :n].long(), ids[:1].long()
    x, sigma = torch.randn(1, 16, 16, 16, generator=gen), torch.tensor([0.6])
    with torch.no_grad():
        outs = [dit(x, sigma, encode_text(te, i), i.shape[1], cap_lengths=torch.tensor([n])) for i in (short, padded)]
    assert outs[0].abs().mean() > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_edit_batches_draw_moves_and_lone_objects_at_their_shares():
    from nano.data import Batches, edit_sample_weights
    from nano.plan import Plan
    from nano.scenes import EDIT_KINDS

    kinds = torch.tensor([0, 1, 2, 2, 0, 2, 0, 0, 2, 1] * 20, dtype=torch.uint8)  # moves: 20 % of the pairs
    objects = torch.tensor(([1, 2, 3] * 67)[:200], dtype=torch.uint8)  # one object alone: a third
    ids, lens = torch.zeros(200, 8, dtype=torch.int32), torch.full((200,), 8, dtype=torch.int32)
    data = {"edit_kind": kinds, "edit_objects": objects, "edit_zh.ids": ids, "edit_zh.len": lens, "edit_en.ids": ids,
            "edit_en.len": lens, "empty.ids": ids[:1], "empty.len": lens[:1]}
    plan, move = Plan(drop_caption=0.0), EDIT_KINDS.index("move")

    def drawn(p):
        return torch.cat([Batches(data, "edit_", plan, p).pick(step, 7, 32)[0] for step in range(200)])

    moves = drawn(edit_sample_weights(data, 0.45))
    assert 0.40 < (kinds[moves] == move).float().mean().item() < 0.50
    assert 0.28 < (objects[moves] == 1).float().mean().item() < 0.39  # the lone share left as drawn
    lone = drawn(edit_sample_weights(data, 0.0, 0.1))
    assert 0.07 < (objects[lone] == 1).float().mean().item() < 0.13
    assert 0.15 < (kinds[lone] == move).float().mean().item() < 0.25  # moves left as drawn
    both = edit_sample_weights(data, 0.45, 0.1)
    assert both.sum() == pytest.approx(1.0)
    assert both[(kinds == move).numpy()].sum() == pytest.approx(0.45, abs=0.02)
    assert both[(objects == 1).numpy()].sum() == pytest.approx(0.1, abs=0.02)
    plain = drawn(None)
    assert 0.15 < (kinds[plain] == move).float().mean().item() < 0.25
    assert edit_sample_weights(data, 0.0, 0.0) is None
    del data["edit_objects"]  # a data set built before counts were recorded: a clear refusal, not a silent plain draw
    with pytest.raises(ValueError, match="records no edit_objects"):
        edit_sample_weights(data, 0.0, 0.1)


def test_make_dit_is_the_same_model_whatever_drew_from_the_global_generator_before():
    from nano.models import make_dit

    first = make_dit(5).state_dict()
    torch.randn(1000)  # compiling, data loading or another stage may draw from it
    second = make_dit(5).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(make_dit(6).state_dict()["cap_pad_token"], first["cap_pad_token"])


def test_compiled_training_steps_compute_what_eager_ones_do(tmp_path):
    """The CPU plan compiles the DiT and trains with PyTorch's fused attention: the same arithmetic, so the same losses."""
    import comfy.ldm.lumina.model

    from nano.models import make_text_encoder, use_sdpa_attention
    from nano.plan import Plan
    from nano.train import train_base

    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 20, (8,), generator=gen, dtype=torch.int32)
    ids = torch.randint(0, 200, (8, 20), generator=gen, dtype=torch.int32)
    data = {"latents": torch.randn(8, 16, 16, 16, generator=gen).half(), "zh.ids": ids, "zh.len": lens, "en.ids": ids,
            "en.len": lens, "empty.ids": ids[:1, :8], "empty.len": torch.tensor([8], dtype=torch.int32)}
    plan = Plan(base_steps=2, batch=4)
    comfy_attention = comfy.ldm.lumina.model.optimized_attention_masked
    losses = []
    try:
        for fast in (False, True):
            if fast:
                use_sdpa_attention()
            (tmp_path / str(fast)).mkdir()
            _, state = train_base(tmp_path / str(fast), plan, data, make_text_encoder(3, list(range(200))), "cpu", 1,
                                  compile_dit=fast)
            losses.append(state["losses"][-1][1])
    finally:
        comfy.ldm.lumina.model.optimized_attention_masked = comfy_attention
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_mottled_colours_drift_smoothly_and_keep_the_shape_codes():
    from nano.latents import LATENT_SCALE, SHAPE_CODES, mottled_colours

    z = torch.randn(64, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    out = mottled_colours(z, torch.Generator().manual_seed(0), share=0.5, size=0.6)
    drift = out - z
    assert torch.equal(drift[:, SHAPE_CODES], torch.zeros_like(drift[:, SHAPE_CODES]))
    moved = drift.abs().amax(dim=(1, 2, 3)) > 0
    assert 16 < int(moved.sum()) < 48  # about half the batch
    norm = drift[moved][:, :12].norm(dim=1) * LATENT_SCALE  # normalised latent units, per latent pixel
    assert 0.02 < float(norm.mean()) < 0.6 and float(norm.amax()) < 1.3  # under orange-to-yellow, mostly far under
    step = (drift[moved][:, :12, :, 1:] - drift[moved][:, :12, :, :-1]).norm(dim=1) * LATENT_SCALE
    assert float(step.mean()) < 0.35 * float(norm.mean())  # smooth: neighbours drift alike
    assert torch.equal(mottled_colours(z, torch.Generator().manual_seed(0), share=0.0, size=0.6), z)


def test_the_training_script_still_offers_what_the_speed_bench_imports_from_it():
    from nano import train

    bench = (REPO_ROOT / "bench" / "bench_train_speed.py").read_text()
    used = set(re.findall(r"\bnt\.([A-Za-z_]\w*)", bench))
    assert used and all(hasattr(train, name) for name in used), sorted(n for n in used if not hasattr(train, n))
