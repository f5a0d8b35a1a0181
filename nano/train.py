"""Train the nano Z-Image family from scratch: VAE, then text encoder + nano-base, then nano-turbo and nano-edit.

    python -m nano.train                       # the whole family into models/, work files in .cache/nano-train
    python -m nano.train --quick               # a few steps on a few samples (what the test runs)
    python -m nano.train --minutes 30          # on a GPU: train for about 30 minutes (the GPU plan)

Every stage is seeded and checkpoints itself (safetensors + JSON) every few minutes, so a stopped run
resumes where it was by running the same command again; finished stages are skipped. Uses CUDA when
torch sees it, with the GPU plan: more data, batches of 512 and as many steps as each stage's share of
`--minutes` allows (the step count is fixed after the first steps are timed, and kept on resume). The DiTs and
the VAE train with PyTorch's fused attention; on the CPU the DiTs and the data set's encoding also run under
torch.compile.
Writes the shipped weights (fp16 safetensors with `zimage.*` metadata) and a report (`training-report.json`,
`training-loss.png`).

This file is the recipe's stages and `main`; the rest lives by job: `plan` (the settings), `models` (ComfyUI's own
classes, so what is trained is exactly what the loader builds at inference), `latents` (the latent format and its
shape and colour codes), `stage` (the resumable loop, checkpoints, EMA), `data` (the data set and its batches) and
`export` (the shipped files and the report).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

from devtools.comfy_runtime import REPO_ROOT, import_comfy

import_comfy()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from . import scenes  # noqa: E402
from .data import Batches, Captions, build_dataset, edit_sample_weights, images_to_tensor, used_token_ids  # noqa: E402
from .export import export, plot_losses, training_report  # noqa: E402
from .latents import (  # noqa: E402
    COLOUR_CODES,
    LATENT_SCALE,
    LATENT_SHIFT,
    SHAPE_CODES,
    channel_weights,
    colour_code_targets,
    crop_pairs,
    degrade_latents,
    edge_weights,
    edit_region_weights,
    fat_footprints,
    mottled_colours,
    shape_code_targets,
)
from .models import VAE, VAE_CONFIG, encode_text, make_dit, make_text_encoder, use_sdpa_attention  # noqa: E402
from .plan import Plan  # noqa: E402
from .stage import EMA, Stage, claim_work_folder, compiled, log, make_optimizer, optimise, step_generator  # noqa: E402

# The names bench/bench_train_speed.py takes from here as `nt.*` (tests/unit/test_nano_train.py checks they stay).
__all__ = ["REPO_ROOT", "Captions", "Plan", "VAE", "compiled", "images_to_tensor", "main", "make_dit",
           "make_text_encoder", "optimise", "train_base", "train_edit", "train_turbo", "use_sdpa_attention",
           "used_token_ids"]

SAMPLING_SHIFT = 3.0


# ---------------------------------------------------------------------------------------------------
# Stage 1: the VAE, on random crops (it is fully convolutional, and crops are 7x cheaper than whole images).

def train_vae(work: Path, plan: Plan, device, seed: int) -> tuple[VAE, dict]:
    vae = VAE()
    vae.reset(seed)
    vae.to(device)
    opt = make_optimizer([{"params": vae.parameters()}])
    stage = Stage("vae", work, {"vae": vae}, opt, plan.vae_steps, lr=1e-3, minutes=plan.stage_minutes("vae"))

    def step_fn(step):
        rng = random.Random(seed * 7919 + step)
        imgs, shapes, colours = [], [], []
        for _ in range(plan.vae_batch):
            scene = scenes.random_edit_pair(rng).before if rng.random() < 0.4 else scenes.random_group_scene(rng, held_out=None)
            c = plan.vae_crop
            x0, y0 = rng.randrange(0, scenes.SIZE - c + 1, 8), rng.randrange(0, scenes.SIZE - c + 1, 8)
            imgs.append(scenes.render(scene).crop((x0, y0, x0 + c, y0 + c)))
            objects = scenes.render_object_masks(scene)[:, y0:y0 + c, x0:x0 + c]
            shapes.append(scenes.masks_by(scene, objects, "shape"))
            colours.append(scenes.masks_by(scene, objects, "colour"))
        x = images_to_tensor(imgs).to(device)
        mean, logvar = vae.encode(x)
        gen = torch.Generator().manual_seed(step)
        eps = torch.randn(mean.shape, generator=gen, device="cpu").to(device)
        z = mean + eps * (0.5 * logvar).exp()
        rec = vae.decode(degrade_latents(z, gen))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-4 * kl
        shape_target = shape_code_targets(torch.from_numpy(np.stack(shapes))).to(device)
        colour_target = colour_code_targets(torch.from_numpy(np.stack(colours))).to(device)
        loss = loss + (mean[:, SHAPE_CODES] - shape_target).pow(2).mean() + (mean[:, COLOUR_CODES] - colour_target).pow(2).mean()
        return optimise(opt, loss, vae.parameters())

    state = stage.run(step_fn)
    return vae, state


def finetune_decoder(work: Path, plan: Plan, vae: VAE, device, seed: int, whole: bool = False) -> dict:
    """The encoder's mid-block attention is global, so whole images give latents that crops never showed the
    decoder. With the encoder frozen (the data set's latents do not change), teach the decoder whole images' latents,
    with the outlines weighted up (`edge_weights`) and, in some latents, the colour wider than the codes' outline
    (`fat_footprints`) or drifting across an object (`mottled_colours`). It learns first on windows of them
    (`Plan.decoder_crop`, 3x cheaper a step), then (`whole`) on whole pictures: a window's edge looks to the decoder
    like the picture's, and the windows alone left a frame round the picture and a tint on its background."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = make_optimizer([{"params": params}])
    name, steps, crop, lr = (("vae-decoder-whole", plan.decoder_whole_steps, 0, 2e-4) if whole else
                             ("vae-decoder", plan.decoder_steps, plan.decoder_crop, 5e-4))
    draws = 1_000_000 if whole else 0  # the whole pictures' scenes and noise are not the windows' again
    stage = Stage(name, work, {"vae": vae}, opt, steps, lr=lr, warmup=50, minutes=plan.stage_minutes(name))

    def step_fn(step):
        rng = random.Random(seed * 7907 + draws + step)
        x = images_to_tensor([scenes.render(scenes.random_edit_pair(rng).after if rng.random() < 0.4 else
                                            scenes.random_group_scene(rng, held_out=None))
                              for _ in range(plan.decoder_batch)]).to(device)
        with torch.no_grad():
            mean, logvar = vae.encode(x)
            gen = torch.Generator().manual_seed(draws + step)
            eps = torch.randn(mean.shape, generator=gen).to(device)
            z = mean + 0.1 * eps * (0.5 * logvar).exp()
            z = fat_footprints(z, degrade_latents(z, gen), gen, plan.decoder_fat)
            z = mottled_colours(z, gen, plan.decoder_mottle, plan.decoder_mottle_size)
            if crop:
                z, x = crop_pairs(z, x, crop // 8, rng)
        rec = vae.decode(z)
        w = edge_weights(x, plan.decoder_edge)
        loss = (w * ((rec - x).abs() + (rec - x).pow(2))).mean() / w.mean()
        return optimise(opt, loss, params)

    state = stage.run(step_fn)
    vae.requires_grad_(True)
    return state


@torch.no_grad()
def normalise_latents(vae: VAE, device, seed: int, n: int = 256) -> dict:
    """Fold a per-channel affine into the quant convs so (latent - 0.1159) * 0.3611 is ~N(0, 1), as the
    Flux latent format ComfyUI applies to Z-Image expects. Exact: the quant convs are 1x1."""
    rng = random.Random(seed)
    x = images_to_tensor([scenes.render(scenes.random_group_scene(rng, held_out=None)) for _ in range(n)]).to(device)
    mean, _ = vae.encode(x)
    m, s = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3)).clamp_min(1e-3)
    a = 1.0 / (LATENT_SCALE * s)
    b = LATENT_SHIFT - m * a
    z = VAE_CONFIG["z_channels"]
    qw, qb = vae.quant_conv.weight[:, :, 0, 0], vae.quant_conv.bias
    scale = torch.cat([a, torch.ones_like(a)])
    new_qw = qw * scale[:, None]
    new_qb = qb * scale + torch.cat([b, 2 * torch.log(a)])
    new_qw[z:] = qw[z:]
    vae.quant_conv.weight.copy_(new_qw[:, :, None, None])
    vae.quant_conv.bias.copy_(new_qb)
    pw, pb = vae.post_quant_conv.weight[:, :, 0, 0], vae.post_quant_conv.bias
    vae.post_quant_conv.weight.copy_((pw / a[None, :])[:, :, None, None])
    vae.post_quant_conv.bias.copy_(pb - (pw * (b / a)[None, :]).sum(1))
    return {"channel_mean": m.tolist(), "channel_std": s.tolist()}


def normalised_vae(work: Path, vae: VAE, device, seed: int) -> None:
    """`normalise_latents` once: the normalised VAE is kept in `work`, and a resume loads it instead."""
    path = work / "vae-normalised.safetensors"
    stats_path = work / "vae-stats.json"
    if not stats_path.exists() or not path.exists():
        stats = normalise_latents(vae, device, seed)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
        stats_path.write_text(json.dumps(stats))
    else:
        vae.load_state_dict(load_file(str(path)))


# ---------------------------------------------------------------------------------------------------
# Stages 3-5 (the data set is stage 2, `data.build_dataset`): rectified flow on latents (base), distillation
# (turbo), reference-image editing (edit).

def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps shifted by 3, as Z-Image's sampling is, so training matches where sampling spends
    steps; half the batch instead draws uniformly, because at 16x16 latents the shift leaves the low-noise steps
    that draw an object's edges almost untrained (1.4% of draws below sigma 0.25)."""
    d = gen.device
    u = torch.sigmoid(torch.randn(n, generator=gen, device=d))
    shifted = SAMPLING_SHIFT * u / (1 + (SAMPLING_SHIFT - 1) * u)
    uniform = torch.rand(n, generator=gen, device=d)
    return torch.where(torch.rand(n, generator=gen, device=d) < 0.5, uniform, shifted).clamp(1e-3, 1.0)


def schedule(steps: int) -> torch.Tensor:
    """The sigmas ComfyUI's `simple` scheduler gives with shift 3 (what KSampler uses for these models)."""
    t = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    s = SAMPLING_SHIFT * t / (1 + (SAMPLING_SHIFT - 1) * t)
    return torch.cat([s, torch.zeros(1)])


def flow_loss(dit, te, latents, ids, lens, gen, device, refs=None, te_grad=True, weights=None):
    z0 = (latents.float().to(device) - LATENT_SHIFT) * LATENT_SCALE
    noise = torch.randn(z0.shape, generator=gen, device=gen.device).to(device)
    sigma = sample_sigmas(z0.shape[0], gen).to(device)
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * z0 + s * noise
    with torch.set_grad_enabled(te_grad):
        ctx = encode_text(te, ids.to(device))
    out = dit(xt, sigma, ctx, ctx.shape[1], cap_lengths=lens.to(device), ref_latents=refs)
    err = (out - (noise - z0)).pow(2)
    return (err if weights is None else err * weights).mean()


def train_base(work, plan, data, te, device, seed, compile_dit=False):
    dit = make_dit(seed + 1).to(device)
    model = compiled(dit, compile_dit)
    ema = EMA(dit, plan.ema_base if plan.base_steps > 1000 else 0.9).to(device)
    opt = make_optimizer([{"params": dit.parameters()}, {"params": te.parameters()}])
    stage = Stage("base", work, {"dit": dit, "te": te, "ema": ema}, opt, plan.base_steps, plan.lr, warmup=200,
                  minutes=plan.stage_minutes("base"))
    batches = Batches(data, "", plan)
    weights = channel_weights(device)

    def step_fn(step):
        gen = step_generator(seed * 1_000_003 + step, device)
        idx, ids, lens = batches.pick(step, seed, plan.batch)
        loss = flow_loss(model, te, data["latents"][idx], ids, lens, gen, device, weights=weights)
        return optimise(opt, loss, list(dit.parameters()) + list(te.parameters()))

    state = stage.run(step_fn, ema)
    dit.load_state_dict(ema.state())
    return dit, state


def teacher_velocity(teacher, xt, sigma, ctx, lens, unc, unc_lens, cfg):
    both = teacher(torch.cat([xt, xt]), torch.cat([sigma, sigma]), torch.cat([ctx, unc]), ctx.shape[1],
                   cap_lengths=torch.cat([lens, unc_lens]))
    cond, uncond = both.chunk(2)
    return uncond + cfg * (cond - uncond)


def train_turbo(work, plan, data, te, teacher, device, seed, compile_dit=False):
    """Teacher-student distillation: the student learns, at cfg 1, to cross each interval of the 8-step
    schedule in one step, matching two guided (cfg 4) teacher steps over the same interval."""
    student = make_dit(seed + 2).to(device)
    student.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)
    te.requires_grad_(False)
    ema = EMA(student, 0.99 if plan.turbo_steps > 200 else 0.5).to(device)
    teacher_model, student_model = compiled(teacher, compile_dit), compiled(student, compile_dit)
    opt = make_optimizer([{"params": student.parameters()}])
    stage = Stage("turbo", work, {"dit": student, "ema": ema}, opt, plan.turbo_steps, plan.lr * 0.4, warmup=50,
                  minutes=plan.stage_minutes("turbo"))
    batches = Batches(data, "", replace(plan, drop_caption=0.0))
    sigmas = schedule(plan.turbo_steps_sampler).to(device)
    with torch.no_grad():  # the empty prompt, for the teacher's unconditional half (the encoder is frozen)
        empty = encode_text(te, data["empty.ids"][:1].long().to(device))
    empty_len = data["empty.len"][:1]

    def step_fn(step):
        gen = step_generator(seed * 1_000_033 + step, device)
        idx, ids, lens = batches.pick(step, seed + 1, plan.batch)
        z0 = (data["latents"][idx].float().to(device) - LATENT_SHIFT) * LATENT_SCALE
        noise = torch.randn(z0.shape, generator=gen, device=gen.device).to(device)
        k = torch.randint(0, plan.turbo_steps_sampler, (z0.shape[0],), generator=gen, device=gen.device).to(device)
        s0, s1 = sigmas[k], sigmas[k + 1]
        x = (1 - s0.view(-1, 1, 1, 1)) * z0 + s0.view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            ctx = encode_text(te, ids.to(device))
            unc = empty.expand(ctx.shape[0], -1, -1)
            # the empty prompt, right-padded to the batch's width (cap_lengths turns the padding into pad tokens)
            unc = torch.nn.functional.pad(unc, (0, 0, 0, max(0, ctx.shape[1] - unc.shape[1])))[:, :ctx.shape[1]]
            unc_lens = empty_len.expand(ctx.shape[0]).clone()
            xs, mid = x, (s0 + s1) / 2
            for a, b in ((s0, mid), (mid, s1)):
                v = teacher_velocity(teacher_model, xs, a, ctx, lens.to(device), unc, unc_lens.to(device), plan.teacher_cfg)
                xs = xs + (b - a).view(-1, 1, 1, 1) * v
            target = (xs - x) / (s1 - s0).view(-1, 1, 1, 1)
        out = student_model(x, s0, ctx, ctx.shape[1], cap_lengths=lens.to(device))
        loss = (out - target).pow(2).mean()
        return optimise(opt, loss, student.parameters())

    state = stage.run(step_fn, ema)
    student.load_state_dict(ema.state())
    return student, state


def train_edit(work, plan, data, te, base, device, seed, compile_dit=False):
    """Instruction editing from nano-base: the input image's latent enters as reference tokens."""
    dit = make_dit(seed + 3).to(device)
    dit.load_state_dict(base.state_dict())
    te.requires_grad_(False)
    ema = EMA(dit, 0.995 if plan.edit_steps > 500 else 0.5).to(device)
    model = compiled(dit, compile_dit)
    opt = make_optimizer([{"params": dit.parameters()}])
    stage = Stage("edit", work, {"dit": dit, "ema": ema}, opt, plan.edit_steps, plan.lr * 0.6, warmup=100,
                  minutes=plan.stage_minutes("edit"))
    batches = Batches(data, "edit_", plan, edit_sample_weights(data, plan.edit_move_share, plan.edit_lone_share))
    weights = channel_weights(device)

    def step_fn(step):
        gen = step_generator(seed * 1_000_037 + step, device)
        idx, ids, lens = batches.pick(step, seed + 2, plan.batch)
        before, after = data["edit_before"][idx], data["edit_after"][idx]
        ref = (before.float().to(device) - LATENT_SHIFT) * LATENT_SCALE
        # focus 0: all ones, the plain loss
        focus = weights * edit_region_weights(before, after, plan.edit_focus, plan.edit_focus_objects)
        loss = flow_loss(model, te, after, ids, lens, gen, device, refs=[ref], te_grad=False, weights=focus)
        return optimise(opt, loss, dit.parameters())

    state = stage.run(step_fn, ema)
    dit.load_state_dict(ema.state())
    return dit, state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models", help="where the weights go (models/<kind>/)")
    ap.add_argument("--work", type=Path, default=None,
                    help="checkpoints and data (default .cache/nano-train, -gpu for the GPU plan, -quick for --quick); it "
                         "records its plan, and another plan's run refuses it")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--quick", action="store_true", help="a few steps on a few samples, to prove the pipeline")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="the GPU plan: how long the training stages run together (building the data set and loading "
                         "take about 2 minutes more on an H200)")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile the DiT stages (base, turbo, edit) and the data set's encoding: about 1.45x "
                         "faster on the CPU, after up to a minute of compiling each; auto: on for the CPU plan, off for "
                         "--quick and the GPU plan (not measured there)")
    ap.add_argument("--plan", choices=("auto", "cpu", "gpu"), default="auto",
                    help="sizes and steps: the CPU plan (fixed steps, about 117 min on 2 cores, compiled) or the GPU plan "
                         "(timed by --minutes); auto picks by device")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    use_gpu_plan = args.plan == "gpu" or (args.plan == "auto" and device.type == "cuda")
    if use_gpu_plan and not args.quick and args.minutes <= 0:
        ap.error("--minutes must be above 0: the GPU plan trains each stage for its share of them")
    plan = Plan.quick() if args.quick else Plan.gpu(args.minutes) if use_gpu_plan else Plan()
    # each plan keeps its own work files: a resume must find the data set and schedules of its own plan
    work = "nano-train-quick" if args.quick else "nano-train-gpu" if use_gpu_plan else "nano-train"
    args.work = args.work or REPO_ROOT / ".cache" / work
    refusal = claim_work_folder(args.work, plan)
    if refusal:
        ap.error(refusal)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.time()
    torch.manual_seed(args.seed)
    use_sdpa_attention()

    stages = {}  # name -> the stage's state (step, losses, seconds), for the report
    vae, stages["vae"] = train_vae(args.work, plan, device, args.seed)
    normalised_vae(args.work, vae, device, args.seed)
    stages["vae-decoder"] = finetune_decoder(args.work, plan, vae, device, args.seed)
    stages["vae-decoder-whole"] = finetune_decoder(args.work, plan, vae, device, args.seed, whole=True)
    vae.eval()
    fast = args.compile == "on" or (args.compile == "auto" and not args.quick and not use_gpu_plan)
    data_path, stages["data"] = build_dataset(args.work, plan, vae, device, args.seed, compile_encoder=fast)
    data = load_file(str(data_path))
    for key in ("latents", "edit_before", "edit_after"):  # batches are gathered where the model runs
        data[key] = data[key].to(device)
    te = make_text_encoder(args.seed + 5, used_token_ids(data)).to(device)
    base, stages["base"] = train_base(args.work, plan, data, te, device, args.seed, compile_dit=fast)
    turbo, stages["turbo"] = train_turbo(args.work, plan, data, te, base, device, args.seed, compile_dit=fast)
    base.requires_grad_(False)
    edit, stages["edit"] = train_edit(args.work, plan, data, te, base, device, args.seed, compile_dit=fast)

    minutes = (time.time() - started) / 60
    report = training_report(args.seed, device, args.quick, plan, stages)
    written = export(args.out, te, vae, {"base": base, "turbo": turbo, "edit": edit}, report)
    report["files"] = {str(p.relative_to(args.out)): p.stat().st_size for p in written}
    report["total_mb"] = round(sum(report["files"].values()) / 2**20, 2)
    (args.out / "training-report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_losses(args.out / "training-loss.png", {k: s["losses"] for k, s in stages.items() if "losses" in s})
    log(f"done in {minutes:.1f} min (the stages took {report['minutes']} min, resumes included); "
        f"{report['total_mb']} MB of weights in {args.out}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
