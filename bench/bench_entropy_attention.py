"""Entropy-pruned attention benchmark: the unpatched model and the patched one, side by side in one process.

    .venv/bin/python -m bench.bench_entropy_attention [--quick] [--skip-quality] [--skip-speed] [--png F]

Quality: the shipped nano-turbo (8 NFE, cfg 1, res_multistep) on the evaluation's held-out prompts, half
Chinese, same seeds; for each setting of the front (a pruning method and a keep ratio, calibration 2 steps):
detector accuracy and its paired drop, PSNR / SSIM of the patched images against the unpatched ones, and the
attention FLOPs removed, per pruned step and over the whole run (calibration and refresh steps run in full).
Speed: the full-size Z-Image architecture (dim 3840, 30 heads; random weights) sampled 8 steps at cfg 1:
unpatched, ours at several keep ratios (the recommended method), core's BlockSparseAttention (Sol-Attn) at its
defaults and with min_tokens lowered so it acts at 1024², and ours on top of it; end-to-end seconds per image
and seconds spent in attention modules (timed around every attention call). On a GPU: 30 layers + 2+2
refiners at 1024² and 2048², bf16. On the CPU (fp32, 1 layer, no refiners: what a benchmark run can hold; core's
sparse attention is CUDA-only, so its rows are listed as missing): 1024² run whole, 2048² composed from
measured per-step times (see `speed`); --quick: 512².
The recommended setting is the one of the front that removes the most attention FLOPs while costing nano-turbo
at most 2 points of accuracy and keeping PSNR at least 30 dB; the last line is the JSON of all figures, with
that setting's `method`, `keep_ratio`, `acc_drop_points`, `psnr_db`, `flops_removed` (per pruned step),
`flops_removed_run`, the speed rows, `speedup_e2e` (largest size), `missing` and `device`.
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

# Pruning methods: what replaces a pruned head and how often a full step refreshes it (heads ranked by entropy,
# calibration CALIBRATION_STEPS steps). "reuse" is the method measured on 2026-11-28; the last is the node's default.
METHODS = {
    "reuse": dict(pruned_heads="reuse", refresh_every=0),
    "reuse, refresh 2": dict(pruned_heads="reuse", refresh_every=2),
    "track_mean": dict(pruned_heads="track_mean", refresh_every=0),
    "track_mean, refresh 2": dict(pruned_heads="track_mean", refresh_every=2),
}
RECOMMENDED = "track_mean, refresh 2"  # the method of the speed rows
# The quality front: (method, keep ratio); --quick measures the recommended method's rows only.
FRONT = [("reuse", 0.75), ("reuse", 0.6), ("reuse, refresh 2", 0.45), ("track_mean", 0.45)] + \
        [(RECOMMENDED, k) for k in (0.6, 0.5, 0.45, 0.4, 0.3)]
SPEED_KEEP_RATIOS = (0.75, 0.6, 0.5, 0.45)
RECOMMENDED_KEEP = 0.45  # the node's default keep ratio; ours combined with core's sparse attention runs at it
FULL_SIZE = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_heads=30,
                 n_kv_heads=30, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                 axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
                 time_scale=1000.0, pad_tokens_multiple=32)


STEPS, CALIBRATION_STEPS = 8, 2


def config(keep_ratio: float, method: str = RECOMMENDED) -> ea.PruneConfig:
    return ea.PruneConfig(calibration_steps=CALIBRATION_STEPS, keep_ratio=keep_ratio, **METHODS[method])


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


def quality(n_scenes: int, front, seed: int = 2026) -> list[dict]:
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
    rows = [{"method": "unpatched", "keep_ratio": 1.0, "patched": False, "acc": round(eval_nano.accuracy(base_scores), 1),
             "psnr_db": None, "ssim": None, "flops_removed": 0.0, "flops_removed_run": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for method, keep in front:
        m = ea.patch_model(model, config(keep, method))
        images, scores = run(m)
        drop, drop_se = paired_drop(base_scores, scores)
        report = ea.state_of(m).report()
        row = {"method": method, "keep_ratio": keep, "patched": True, "acc": round(eval_nano.accuracy(scores), 1),
               "acc_drop_points": round(drop, 1), "acc_drop_se": round(drop_se, 1),
               "psnr_db": round(float(np.mean([psnr(a, b) for a, b in zip(reference, images, strict=True)])), 2),
               "ssim": round(float(np.mean([ssim(a, b) for a, b in zip(reference, images, strict=True)])), 4),
               "flops_removed": report["attention_flops_removed"],
               "flops_removed_run": report["attention_flops_removed_run"]}
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


def core_sparse_attention(model, min_tokens: int | None = None):
    """Core's BlockSparseAttention (Sol-Attn) on `model`, through its node, at its defaults (or `min_tokens`);
    (None, why) where this ComfyUI or this device cannot run it."""
    try:
        from comfy_extras.nodes_sparse_attention import BlockSparseAttention
    except Exception as e:  # noqa: BLE001 - older ComfyUI, or comfy_kitchen missing: say which
        return None, f"this ComfyUI has no BlockSparseAttention ({type(e).__name__}: {e})"
    if mm.get_torch_device().type != "cuda":
        return None, "BlockSparseAttention runs on CUDA only"
    kwargs = {} if min_tokens is None else {"min_tokens": min_tokens}
    return BlockSparseAttention.execute(model, {"selection": "sol-attn", "tau": 1.3}, 0.2, 1.0, **kwargs).result[0], None


def variants(model, ratios, sparse_min_tokens: int) -> tuple[list[tuple[str, object, float | None]], list[str]]:
    """The patched models measured against the unpatched one: ours at each keep ratio, core's sparse attention at its
    defaults and with min_tokens lowered, and ours on top of core's sparse attention (the kept heads' attention
    goes through its override). Also what could not be measured, and why."""
    out = [(f"ours keep {keep}", ea.patch_model(model, config(keep)), keep) for keep in ratios]
    missing = []
    sparse, why = core_sparse_attention(model)
    if sparse is None:
        return out, [f"core sparse attention and ours combined with it: {why}"]
    out.append(("core sparse (defaults)", sparse, None))
    lowered, _ = core_sparse_attention(model, sparse_min_tokens)
    out.append((f"core sparse (min_tokens {sparse_min_tokens})", lowered, None))
    keep = RECOMMENDED_KEEP if RECOMMENDED_KEEP in ratios else ratios[-1]
    out.append((f"ours keep {keep} + core sparse (min_tokens {sparse_min_tokens})",
                ea.patch_model(lowered, config(keep)), keep))
    return out, missing


def compose(step_seconds: list[float], pruned_steps: int, refresh_steps: int, full_step: float) -> float:
    """A STEPS-step time from a run of the calibration steps and one pruned step: those, the pruned step again,
    and each refresh step at the unpatched step's time."""
    return sum(step_seconds[:CALIBRATION_STEPS]) + pruned_steps * step_seconds[-1] + refresh_steps * full_step


def step_counts(m) -> tuple[int, int]:
    """(pruned, refresh) steps of a STEPS-step run of patched model `m`, from its own phase rule."""
    state = ea.state_of(m)
    if state is None:
        return 0, 0
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    state.sigmas = None
    phases = [state.phase({"sample_sigmas": sigmas, "sigmas": sigmas[i:i + 1]}) for i in range(STEPS)]
    state.sigmas = None
    return phases.count(ea.PRUNE), phases.count(ea.REFRESH)


def speed(quick: bool, ratios, only_sizes=None) -> tuple[list[dict], str, list[str]]:
    """Unpatched vs each variant, STEPS steps with CALIBRATION_STEPS calibrating. Where a whole run does not
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
    sparse_min_tokens = 1024  # core's default 12 288 leaves 1024² (4096 image tokens) dense
    sample_seconds(model, sizes[0], 1)  # warm-up: kernels, allocator, model load
    measured, missing = variants(model, ratios, sparse_min_tokens)
    for _, m, keep in measured:  # warm-up of each path (calibration, then pruned steps), or its first row pays
        sample_seconds(m, sizes[0], CALIBRATION_STEPS + 1 if keep else 2)
    rows = []
    for side in sizes:
        if side in composed:
            step = sample_seconds(model, side, 1, diffusion_model)
            base_step = step["steps"][0]
            base_e2e, base_attn = STEPS * base_step, STEPS * step["attention"]
        else:
            base_e2e = sample_seconds(model, side, STEPS)["e2e"] if gpu else None
            run = sample_seconds(model, side, STEPS, diffusion_model)
            base_e2e, base_attn = base_e2e or run["e2e"], run["attention"]
        for label, m, keep in measured:
            if side in composed:
                pruned, refresh = step_counts(m)
                run = sample_seconds(m, side, CALIBRATION_STEPS + 1, diffusion_model)
                e2e = compose(run["steps"], pruned, refresh, base_step)
                attn = compose(run["step_attention"], pruned, refresh, base_attn / STEPS)
            else:
                e2e = sample_seconds(m, side, STEPS)["e2e"] if gpu else None
                run = sample_seconds(m, side, STEPS, diffusion_model)
                e2e, attn = e2e or run["e2e"], run["attention"]
            state = ea.state_of(m)
            report = state.report() if state is not None else {}
            if side in composed and report:  # the report saw the short run: count the STEPS-step run's pruned steps
                report["attention_flops_removed_run"] = round(report["attention_flops_removed"] * pruned / STEPS, 4)
            row = {"size": side, "variant": label, "keep_ratio": keep, "unpatched_s": round(base_e2e, 3),
                   "patched_s": round(e2e, 3), "speedup_e2e": round(base_e2e / e2e, 3),
                   "unpatched_attention_s": round(base_attn, 3), "patched_attention_s": round(attn, 3),
                   "speedup_attention": round(base_attn / max(attn, 1e-9), 3),
                   "flops_removed": report.get("attention_flops_removed"),
                   "flops_removed_run": report.get("attention_flops_removed_run"), "composed": side in composed}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows, setup, missing


def plot(path: Path, figures: dict) -> None:
    """The curve as a PNG, drawn with PIL: keep ratio against nano-turbo accuracy, PSNR, and end-to-end speedup."""
    from PIL import Image, ImageDraw
    quality_rows, speed_rows = figures.get("quality", []), figures.get("speed", [])
    base = quality_rows[0] if quality_rows else None
    methods = list(dict.fromkeys(r["method"] for r in quality_rows if r["patched"]))

    def per_method(field, start):
        return [(method, ([(1.0, start)] if start is not None else []) +
                 [(r["keep_ratio"], r[field]) for r in quality_rows if r["method"] == method]) for method in methods]

    ours = [r for r in speed_rows if r["variant"].startswith("ours keep") and "+" not in r["variant"]]
    panels = [("nano-turbo detector accuracy, %", per_method("acc", base["acc"] if base else None),
               base["acc"] - 2 if base else None),
              ("PSNR vs unpatched, dB", per_method("psnr_db", None), 30.0),
              (f"end-to-end speedup ({figures.get('device', '?')})",
               [(f"{side} px", [(1.0, 1.0)] + [(r["keep_ratio"], r["speedup_e2e"]) for r in ours if r["size"] == side])
                for side in sorted({r["size"] for r in ours})], 1.25)]
    panels = [panel for panel in panels if any(len(points) > 1 for _, points in panel[1])]  # a run without speed: two
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
            draw.text((x0 + left + 6, top + 6 + 14 * j), label, fill=colour)
    img.save(path)


def recommend(quality_rows: list[dict]) -> dict | None:
    """The setting that removes the most attention FLOPs (per pruned step, then over the run) at ≤ 2 points of
    accuracy and ≥ 30 dB; between equals, the higher PSNR."""
    ok = [r for r in quality_rows if r["patched"] and r["acc_drop_points"] <= 2.0 and r["psnr_db"] >= 30.0]
    return max(ok, key=lambda r: (r["flops_removed"], r["flops_removed_run"], r["psnr_db"])) if ok else None


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "10 scenes (20 prompts), the recommended method only; the smallest CPU "
                                                "speed setting")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    common.add_cpu_option(ap)
    ap.add_argument("--sizes", type=int, nargs="+", help="speed: only these of the default sizes")
    ap.add_argument("--keep-ratios", type=float, nargs="+",
                    help=f"speed: these keep ratios (default on a GPU: {', '.join(map(str, SPEED_KEEP_RATIOS))})")
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
    gpu = mm.get_torch_device().type == "cuda"
    figures: dict = {"quick": args.quick, "recommended_method": RECOMMENDED, "methods": METHODS}
    front = [(m, k) for m, k in FRONT if m == RECOMMENDED] if args.quick else FRONT
    quality_rows = [] if args.skip_quality else quality(10 if args.quick else 50, front)
    best = recommend(quality_rows) if quality_rows else None
    if quality_rows:
        figures.update(nano_turbo_acc=quality_rows[0]["acc"], quality=quality_rows)
    if best is not None:
        figures.update(method=best["method"], keep_ratio=best["keep_ratio"], acc_drop_points=best["acc_drop_points"],
                       acc_drop_se=best["acc_drop_se"], psnr_db=best["psnr_db"], ssim=best["ssim"],
                       flops_removed=best["flops_removed"], flops_removed_run=best["flops_removed_run"])
    else:
        figures.update(method=None, keep_ratio=None, acc_drop_points=None, psnr_db=None,
                       note="no setting met both quality bars" if quality_rows else "quality skipped")
    if not args.skip_speed:
        ratios = sorted(set(args.keep_ratios) if args.keep_ratios else SPEED_KEEP_RATIOS if gpu else
                        {RECOMMENDED_KEEP, best["keep_ratio"] if best else 0.75}, reverse=True)
        speed_rows, setup, missing = speed(args.quick, ratios, args.sizes)
        largest = max(r["size"] for r in speed_rows)
        chosen = next(k for k in (figures["keep_ratio"], RECOMMENDED_KEEP, ratios[0]) if k in ratios)
        pick = next(r for r in speed_rows if r["size"] == largest and r["variant"] == f"ours keep {chosen}")
        figures.update(speed=speed_rows, speed_setup=setup, speedup_e2e=pick["speedup_e2e"],
                       speedup_attention=pick["speedup_attention"], speed_at=f"{largest}², {RECOMMENDED}, keep {chosen}")
        if not gpu:
            missing.insert(0, "GPU figures: the full-size model (30 layers + refiners, bf16) at 1024² and 2048² needs a "
                              "GPU; run this script where CUDA is present")
        if missing:
            figures["missing"] = missing
    figures.update(device=common.device_name(), machine=common.machine(), seconds=round(time.time() - started, 1))
    if args.png:
        plot(args.png, figures)
    common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
