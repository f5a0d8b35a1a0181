"""Entropy-pruned attention benchmark: the unpatched model and the patched one, side by side in one process.

    .venv/bin/python -m bench.bench_entropy_attention [--quick] [--skip-quality] [--skip-speed] [--png F]

Quality: the shipped nano-turbo (8 NFE, cfg 1, res_multistep) on the evaluation's held-out prompts, half
Chinese, same seeds; for each keep ratio (calibration 2 steps, pruned heads reused): detector accuracy, and
PSNR / SSIM of the patched images against the unpatched ones.
Speed: the full-size Z-Image architecture (dim 3840, 30 heads; random weights) sampled 8 steps at cfg 1,
unpatched and patched: end-to-end seconds per image and the seconds spent in attention modules (timed
around every attention call). On a GPU: 30 layers + 2+2 refiners at 1024² and 2048², bf16, every keep ratio.
On the CPU (fp32, 1 layer, no refiners: what a benchmark run can hold; keep 0.5 and the recommended ratio):
1024² run whole, 2048² composed from measured per-step times (see `speed`); --quick: 512².
The recommended setting is the smallest keep ratio that costs nano-turbo at most 2 points of accuracy and
keeps PSNR at least 30 dB; the last line is the JSON of all figures, with that setting's `keep_ratio`,
`speedup_e2e` (largest size), `acc_drop_points`, `psnr_db` and `device`.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

from bench import common

common.start_comfy()

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from comfy.ldm.lumina.model import JointAttention  # noqa: E402
from comfyui_zimage.nodes import entropy_attention as ea  # noqa: E402

from bench import eval_nano  # noqa: E402
from nano import detector, scenes  # noqa: E402

KEEP_RATIOS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.25)
FULL_SIZE = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_heads=30,
                 n_kv_heads=30, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                 axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
                 time_scale=1000.0, pad_tokens_multiple=32)


STEPS, CALIBRATION_STEPS = 8, 2


def config(keep_ratio: float) -> ea.PruneConfig:
    return ea.PruneConfig(calibration_steps=CALIBRATION_STEPS, keep_ratio=keep_ratio, pruned_heads="reuse")


# ---------------------------------------------------------------------------------------------------
# Quality on nano-turbo.

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma, 11x11 Gaussian window (sigma 1.5), the usual constants."""
    def luma(x):
        t = torch.from_numpy(x.astype(np.float64))
        return (0.299 * t[..., 0] + 0.587 * t[..., 1] + 0.114 * t[..., 2])[None, None]

    x, y = luma(a), luma(b)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = (g / g.sum())
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return F.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def paired_drop(reference: list[dict], scores: list[dict]) -> tuple[float, float]:
    """Accuracy drop in points (reference − patched) and its standard error over prompts (paired: same seeds)."""
    asked = sum(len(r) for r in reference)
    d = np.array([sum(a.values()) - sum(b.values()) for a, b in zip(reference, scores, strict=True)], dtype=np.float64)
    return 100.0 * d.sum() / asked, 100.0 * math.sqrt(len(d) * d.var(ddof=1)) / asked


def quality(n_scenes: int, seed: int = 2026) -> list[dict]:
    model, clip, vae = eval_nano.load("turbo")
    rng = random.Random(seed)
    prompts = [(scene, lang) for scene in (scenes.random_group_scene(rng, held_out=True) for _ in range(n_scenes))
               for lang in ("zh", "en")]

    def run(m):
        images, scores = [], []
        for i, (scene, lang) in enumerate(prompts):
            image = eval_nano.generate(m, clip, vae, scenes.caption(scene, lang), seed + i // 2, 8, 1.0)
            images.append(np.asarray(image))
            scores.append(detector.score_prompt(scene, image))
        return images, scores

    reference, base_scores = run(model)
    rows = [{"keep_ratio": 1.0, "patched": False, "acc": round(eval_nano.accuracy(base_scores), 1), "psnr_db": None,
             "ssim": None, "flops_removed": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for keep in KEEP_RATIOS:
        m = ea.patch_model(model, config(keep))
        images, scores = run(m)
        drop, drop_se = paired_drop(base_scores, scores)
        row = {"keep_ratio": keep, "patched": True, "acc": round(eval_nano.accuracy(scores), 1),
               "acc_drop_points": round(drop, 1), "acc_drop_se": round(drop_se, 1),
               "psnr_db": round(float(np.mean([psnr(a, b) for a, b in zip(reference, images, strict=True)])), 2),
               "ssim": round(float(np.mean([ssim(a, b) for a, b in zip(reference, images, strict=True)])), 4),
               "flops_removed": ea.state_of(m).report()["attention_flops_removed"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------
# Speed on the full-size architecture.

def full_size_model(n_layers: int, n_refiner: int, dtype: torch.dtype):
    model_config = comfy.supported_models.ZImage(dict(FULL_SIZE, n_layers=n_layers, n_refiner_layers=n_refiner))
    model_config.set_inference_dtype(dtype, None)
    device = mm.get_torch_device()
    model = model_config.get_model({}, "", device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim > 1:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in ** -0.5, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


class Clock:
    """Seconds spent in attention modules and in each diffusion-model call (one call per step at cfg 1),
    synchronised around each call on a GPU."""

    def __init__(self, diffusion_model):
        self.attention, self.in_step, self.steps, self.step_attention = 0.0, 0.0, [], []
        self.handles, self.started = [], {}
        for module in diffusion_model.modules():
            if isinstance(module, JointAttention):
                self.handles.append(module.register_forward_pre_hook(self.pre))
                self.handles.append(module.register_forward_hook(self.post_attention))
        self.handles.append(diffusion_model.register_forward_pre_hook(self.pre))
        self.handles.append(diffusion_model.register_forward_hook(self.post_step))

    def now(self) -> float:
        common.sync()
        return time.perf_counter()

    def pre(self, module, *_):
        self.started[id(module)] = self.now()

    def post_attention(self, module, *_):
        seconds = self.now() - self.started.pop(id(module))
        self.attention += seconds
        self.in_step += seconds

    def post_step(self, module, *_):
        self.steps.append(self.now() - self.started.pop(id(module)))
        self.step_attention.append(self.in_step)
        self.in_step = 0.0

    def remove(self):
        for h in self.handles:
            h.remove()


def sample_seconds(model, side: int, steps: int, diffusion_model=None) -> dict:
    """One sampling run: end-to-end seconds, and with `diffusion_model` given also attention seconds and
    per-step seconds (the hooks synchronise on a GPU, so there the end-to-end time comes from a run without)."""
    latent = torch.zeros(1, 16, side // 8, side // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    gen = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 32, FULL_SIZE["cap_feat_dim"], generator=gen), {}]]
    clock = Clock(diffusion_model) if diffusion_model is not None else None
    common.sync()
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=0, disable_pbar=True)
    common.sync()
    seconds = time.perf_counter() - start
    if clock is None:
        return {"e2e": seconds}
    clock.remove()
    return {"e2e": seconds, "attention": clock.attention, "steps": clock.steps, "step_attention": clock.step_attention}


def compose(step_seconds: list[float]) -> float:
    """A STEPS-step time from a run of the calibration steps and one pruned step: those, and the pruned step again."""
    return sum(step_seconds[:CALIBRATION_STEPS]) + (STEPS - CALIBRATION_STEPS) * step_seconds[-1]


def speed(quick: bool, ratios, only_sizes=None) -> tuple[list[dict], str]:
    """Unpatched vs patched sampling, STEPS steps with CALIBRATION_STEPS calibrating. Where a whole run does not
    fit (2048² on the CPU), the patched model runs only its calibration steps and one pruned step, the unpatched
    one a single step, and the STEPS-step times are composed from those measured per-step times."""
    gpu = mm.get_torch_device().type == "cuda"
    if gpu:
        layers, refiner, sizes, dtype, composed = 30, 2, [1024, 2048], torch.bfloat16, set()
    elif quick:
        layers, refiner, sizes, dtype, composed = 1, 0, [512], torch.float32, set()
    else:
        layers, refiner, sizes, dtype, composed = 1, 0, [1024, 2048], torch.float32, {2048}
    if only_sizes and not set(only_sizes) & set(sizes):
        raise SystemExit(f"--sizes: none of {only_sizes} is measured in this mode; choose from {sizes}")
    sizes = [s for s in sizes if s in only_sizes] if only_sizes else sizes
    model = full_size_model(layers, refiner, dtype)
    diffusion_model = model.model.diffusion_model
    setup = f"{layers} layers + {refiner}+{refiner} refiners, {str(dtype).removeprefix('torch.')}, {STEPS} steps"
    sample_seconds(model, sizes[0], 1)  # warm-up: kernels, allocator, model load
    # the patched path too (calibration, then pruned steps), or the first patched row pays its one-off costs
    sample_seconds(ea.patch_model(model, config(ratios[0])), sizes[0], CALIBRATION_STEPS + 1)
    rows = []
    for side in sizes:
        if side in composed:
            step = sample_seconds(model, side, 1, diffusion_model)
            base_e2e, base_attn = STEPS * step["steps"][0], STEPS * step["attention"]
        else:
            base_e2e = sample_seconds(model, side, STEPS)["e2e"] if gpu else None
            run = sample_seconds(model, side, STEPS, diffusion_model)
            base_e2e, base_attn = base_e2e or run["e2e"], run["attention"]
        for keep in ratios:
            m = ea.patch_model(model, config(keep))
            if side in composed:
                run = sample_seconds(m, side, CALIBRATION_STEPS + 1, diffusion_model)
                e2e, attn = compose(run["steps"]), compose(run["step_attention"])
            else:
                e2e = sample_seconds(m, side, STEPS)["e2e"] if gpu else None
                run = sample_seconds(m, side, STEPS, diffusion_model)
                e2e, attn = e2e or run["e2e"], run["attention"]
            row = {"size": side, "keep_ratio": keep, "unpatched_s": round(base_e2e, 3), "patched_s": round(e2e, 3),
                   "speedup_e2e": round(base_e2e / e2e, 3), "unpatched_attention_s": round(base_attn, 3),
                   "patched_attention_s": round(attn, 3), "speedup_attention": round(base_attn / max(attn, 1e-9), 3),
                   "flops_removed": ea.state_of(m).report()["attention_flops_removed"], "composed": side in composed}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows, setup


def plot(path: Path, figures: dict) -> None:
    """The curve as a PNG, drawn with PIL: keep ratio against nano-turbo accuracy, PSNR, and end-to-end speedup."""
    from PIL import Image, ImageDraw
    quality_rows, speed_rows = figures.get("quality", []), figures.get("speed", [])
    panels = [("nano-turbo detector accuracy, %", [("accuracy", [(r["keep_ratio"], r["acc"]) for r in quality_rows])],
               quality_rows[0]["acc"] - 2 if quality_rows else None),
              ("PSNR vs unpatched, dB", [("PSNR", [(r["keep_ratio"], r["psnr_db"]) for r in quality_rows
                                                   if r["psnr_db"] is not None])], 30.0),
              (f"end-to-end speedup ({figures.get('device', '?')})",
               [(f"{side} px", [(1.0, 1.0)] + [(r["keep_ratio"], r["speedup_e2e"]) for r in speed_rows if r["size"] == side])
                for side in sorted({r["size"] for r in speed_rows})], 1.25)]
    colours = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (160, 60, 160)]
    w, h, left, top, bottom = 360, 300, 50, 40, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, series, bar) in enumerate(panels):
        x0 = i * w
        values = [v for _, pts in series for _, v in pts] + ([bar] if bar is not None else [])
        if not values:
            continue
        lo, hi = min(values), max(values)
        lo, hi = lo - 0.08 * (hi - lo or 1), hi + 0.08 * (hi - lo or 1)

        def xy(keep, value, x0=x0, lo=lo, hi=hi):  # keep ratio 1.0 at the left, 0.2 at the right
            return (x0 + left + (w - left - 20) * (1.0 - keep) / 0.8, h - bottom - (h - top - bottom) * (value - lo) / (hi - lo))

        draw.rectangle([x0 + left, top, x0 + w - 20, h - bottom], outline=(170, 170, 170))
        draw.text((x0 + left, 12), title, fill="black")
        for k in (1.0, 0.8, 0.6, 0.4, 0.2):
            x, _ = xy(k, lo)
            draw.text((x - 8, h - bottom + 6), f"{k:.1f}", fill="black")
        draw.text((x0 + w // 2 - 20, h - 18), "keep ratio", fill="black")
        for v in (lo + (hi - lo) * t for t in (0.1, 0.5, 0.9)):
            draw.text((x0 + 4, xy(1.0, v)[1] - 6), f"{v:.3g}", fill="black")
        if bar is not None:
            draw.line([xy(1.0, bar), xy(0.2, bar)], fill=(150, 150, 150), width=1)
            draw.text((xy(0.2, bar)[0] - 22, xy(0.2, bar)[1] - 14), "bar", fill=(120, 120, 120))
        for j, (label, pts) in enumerate(series):
            pts = sorted(pts, reverse=True)
            colour = colours[j % len(colours)]
            if len(pts) > 1:
                draw.line([xy(k, v) for k, v in pts], fill=colour, width=2)
            for k, v in pts:
                x, y = xy(k, v)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            draw.text((x0 + w - 90, top + 6 + 14 * j), label, fill=colour)
    img.save(path)


def recommend(quality_rows: list[dict]) -> dict | None:
    ok = [r for r in quality_rows if r["patched"] and r["acc_drop_points"] <= 2.0 and r["psnr_db"] >= 30.0]
    return min(ok, key=lambda r: r["keep_ratio"]) if ok else None


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "10 scenes (20 prompts); the smallest CPU speed setting")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    common.add_cpu_option(ap)
    ap.add_argument("--sizes", type=int, nargs="+", help="speed: only these of the default sizes")
    ap.add_argument("--keep-ratios", type=float, nargs="+", help="speed: these keep ratios (default: the curve's on a GPU)")
    ap.add_argument("--png", type=Path, help="also draw the curve (keep ratio vs accuracy, PSNR, speedup) here")
    ap.add_argument("--replot", type=Path, help="only draw --png from a saved run's output (its last line)")
    args = ap.parse_args()
    if args.replot:
        lines = [line for line in args.replot.read_text().splitlines() if line.startswith("{")]
        plot(args.png, json.loads(lines[-1]))
        return 0
    torch.set_grad_enabled(False)
    eval_nano.register_models()
    started = time.time()
    figures: dict = {"quick": args.quick}
    quality_rows = [] if args.skip_quality else quality(10 if args.quick else 50)
    best = recommend(quality_rows) if quality_rows else None
    default_row = next((r for r in quality_rows if r["keep_ratio"] == ea.PruneConfig().keep_ratio), None)
    if quality_rows:
        figures.update(nano_turbo_acc=quality_rows[0]["acc"], quality=quality_rows,
                       default_keep_ratio=ea.PruneConfig().keep_ratio,
                       default_acc_drop_points=default_row["acc_drop_points"] if default_row else None)
    if best is not None:
        figures.update(keep_ratio=best["keep_ratio"], acc_drop_points=best["acc_drop_points"], psnr_db=best["psnr_db"],
                       ssim=best["ssim"])
    else:
        figures.update(keep_ratio=None, acc_drop_points=None, psnr_db=None,
                       note="no keep ratio met both quality bars" if quality_rows else "quality skipped")
    if not args.skip_speed:
        ratios = sorted(set(args.keep_ratios) if args.keep_ratios else
                        {r for r in KEEP_RATIOS} if mm.get_torch_device().type == "cuda" else
                        {0.5, best["keep_ratio"] if best else 0.75}, reverse=True)
        speed_rows, setup = speed(args.quick, ratios, args.sizes)
        largest = max(r["size"] for r in speed_rows)
        chosen = figures["keep_ratio"] if figures["keep_ratio"] in ratios else ratios[0]
        pick = next(r for r in speed_rows if r["size"] == largest and r["keep_ratio"] == chosen)
        figures.update(speed=speed_rows, speed_setup=setup, speedup_e2e=pick["speedup_e2e"],
                       speedup_attention=pick["speedup_attention"], speed_at=f"{largest}², keep {chosen}")
    figures.update(device=common.device_name(), machine=common.machine(), seconds=round(time.time() - started, 1))
    if args.png:
        plot(args.png, figures)
    common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
