"""Training speed of the nano family's stages: eager with ComfyUI's default attention against the training script's
own setting (PyTorch's fused attention, `torch.compile`), side by side in one process.

    .venv/bin/python -m bench.bench_train_speed [--quick]

Each DiT stage (base, turbo, edit) runs the training script's own stage function (`nano.train.train_base` and so on,
on a temporary work folder) for a few untimed steps (compiling, for ours) and then `--steps` timed ones, on real
data: scenes rendered and encoded with the shipped VAE, captions tokenized as the recipe does. Both runs start each
stage from the same weights and batches, so their first losses must agree (`loss_rel_diff`: compiling changes the order of float
sums, not the arithmetic). The data set's VAE encoding is timed the same way, with the latents' largest difference.
The last line is the JSON of the figures; no GPU is used.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench import common

common.start_comfy(cpu=True, plugin=False)

import comfy.ldm.lumina.model  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from nano import scenes  # noqa: E402
from nano import train as nt  # noqa: E402

COMFY_ATTENTION = comfy.ldm.lumina.model.optimized_attention_masked  # what ComfyUI picked for this machine


def small_data_set(n_scenes: int, n_pairs: int) -> tuple[dict, nt.VAE]:
    """The recipe's data set in small: rendered scenes and edit pairs, encoded by the shipped VAE, captions tokenized."""
    vae = nt.VAE()
    vae.load_state_dict({k: v.float() for k, v in load_file(str(nt.REPO_ROOT / "models/vae/nano_ae.safetensors")).items()})
    vae.eval()
    rng, captions = random.Random(0), nt.Captions()
    group = [scenes.random_group_scene(rng) for _ in range(n_scenes)]
    pairs = [scenes.random_edit_pair(rng) for _ in range(n_pairs)]

    def encode(images):
        with torch.no_grad():
            return torch.cat([vae.encode(nt.images_to_tensor(images[k:k + 64]))[0] for k in range(0, len(images), 64)])

    data = {"latents": encode([scenes.render(s) for s in group]),
            "edit_before": encode([scenes.render(p.before) for p in pairs]),
            "edit_after": encode([scenes.render(p.after) for p in pairs]),
            "edit_kind": torch.tensor([scenes.EDIT_KINDS.index(p.kind) for p in pairs], dtype=torch.uint8),
            "edit_objects": torch.tensor([len(p.before.items) for p in pairs], dtype=torch.uint8)}
    texts = {"zh": [scenes.caption(s, "zh", rng) for s in group], "en": [scenes.caption(s, "en", rng) for s in group],
             "edit_zh": [scenes.edit_instruction(p, "zh", rng) for p in pairs],
             "edit_en": [scenes.edit_instruction(p, "en", rng) for p in pairs], "empty": [""]}
    for name, rows in texts.items():
        data[f"{name}.ids"], data[f"{name}.len"] = captions.table(rows)
    return data, vae


def time_stages(data: dict, warmup: int, steps: int, fast: bool) -> dict:
    """Seconds per step and the first loss of each DiT stage, run by the training script's own stage functions."""
    comfy.ldm.lumina.model.optimized_attention_masked = COMFY_ATTENTION
    if fast:
        nt.use_sdpa_attention()
    clock, losses, stage = {}, {}, [""]
    optimise = nt.optimise

    def timed(opt, loss, params):  # every stage's step ends here
        value = optimise(opt, loss, params)
        clock.setdefault(stage[0], []).append(time.perf_counter())
        losses.setdefault(stage[0], value)
        return value

    nt.optimise = timed
    n = warmup + steps
    plan = replace(nt.Plan(), base_steps=n, turbo_steps=n, edit_steps=n)
    te = nt.make_text_encoder(1239, nt.used_token_ids(data))
    try:
        with tempfile.TemporaryDirectory() as work:
            stage[0] = "base"
            nt.train_base(Path(work), plan, data, te, "cpu", 1234, compile_dit=fast)
            # turbo and edit start from one fixed model, not from this run's few base steps (which the two runs
            # round differently), so their first losses compare like for like
            base = nt.make_dit(7)
            with torch.no_grad():  # an output layer that says something (adaLN-Zero starts it at zero)
                for p in base.final_layer.parameters():
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(8))
            stage[0] = "turbo"
            nt.train_turbo(Path(work), plan, data, te, base, "cpu", 1234, compile_dit=fast)
            base.requires_grad_(False)
            stage[0] = "edit"
            nt.train_edit(Path(work), plan, data, te, base, "cpu", 1234, compile_dit=fast)
    finally:
        nt.optimise = optimise
        comfy.ldm.lumina.model.optimized_attention_masked = COMFY_ATTENTION
    return {k: {"s_per_step": (v[-1] - v[warmup - 1]) / steps, "first_loss": losses[k]} for k, v in clock.items()}


def time_encoding(vae: nt.VAE, images: list, fast: bool) -> tuple[float, torch.Tensor]:
    encode = nt.compiled(vae.encode, fast)
    x = nt.images_to_tensor(images)
    with torch.no_grad():
        encode(x[:64])  # compiles, for ours
        start = time.perf_counter()
        out = torch.cat([encode(x[k:k + 64])[0] for k in range(0, len(x), 64)])
    return (time.perf_counter() - start) / len(x), out


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "fewer timed steps and images")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per stage (default 40, --quick 15)")
    args = ap.parse_args()
    steps = args.steps or (15 if args.quick else 40)
    warmup = 5  # the first steps compile (ours) and settle
    started = time.time()
    data, vae = small_data_set(256, 128)
    baseline = time_stages(data, warmup, steps, fast=False)
    ours = time_stages(data, warmup, steps, fast=True)
    figures = {"quick": args.quick, "timed_steps": steps}
    for name in ("base", "turbo", "edit"):
        b, o = baseline[name], ours[name]
        figures[name] = {"eager_s_per_step": round(b["s_per_step"], 3), "ours_s_per_step": round(o["s_per_step"], 3),
                         "speedup": round(b["s_per_step"] / o["s_per_step"], 2),
                         "loss_rel_diff": float(f"{abs(o['first_loss'] - b['first_loss']) / b['first_loss']:.2e}")}
        print(f"{name}: {b['s_per_step']:.3f} -> {o['s_per_step']:.3f} s per step "
              f"({figures[name]['speedup']}x); first loss {b['first_loss']:.5f} / {o['first_loss']:.5f}", flush=True)
    rng = random.Random(1)
    images = [scenes.render(scenes.random_group_scene(rng)) for _ in range(256 if args.quick else 512)]
    eager_s, eager_z = time_encoding(vae, images, fast=False)
    ours_s, ours_z = time_encoding(vae, images, fast=True)
    figures["vae_encode"] = {"eager_ms_per_image": round(eager_s * 1000, 2), "ours_ms_per_image": round(ours_s * 1000, 2),
                             "speedup": round(eager_s / ours_s, 2),
                             "max_abs_diff": float(f"{(ours_z - eager_z).abs().max():.2e}")}
    print(f"VAE encode: {eager_s * 1000:.2f} -> {ours_s * 1000:.2f} ms per image ({figures['vae_encode']['speedup']}x)")
    figures.update(seconds=round(time.time() - started, 1), machine=common.machine())
    common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
