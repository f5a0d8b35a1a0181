"""k_gen probe overhead: sampling with and without the probe, side by side in one process.

    .venv/bin/python -m bench.bench_kgen_probe [--quick] [--cpu] [--full-size] [--layers N] [--size PX]
                                               [--base-steps N] [--repeats N] [--skip-nano]

On the shipped nano-turbo (8 steps, cfg 1, res_multistep, 128², batch 1 and 4): runs with and without the
probe alternate, and `overhead` is the ratio of their median times minus 1. `noise` is the same figure
between the two halves of the unprobed runs, the smallest overhead this machine can tell from zero.
On a GPU, also the full-size Z-Image architecture (30 layers + 2+2 refiners, dim 3840, bf16, **random
weights**) at 1024²: the probe's overhead there (batch 1, turbo 8 steps cfg 1), and a k_gen table in the study's
format (turbo 8 NFE at cfg 1, base 30 NFE at cfg 4; batch 1 and 4; res_multistep) made by the probe and report
themselves: k_gen = NFE/Δt, the linearised convergence fit 1/(1 − I) = k_gen·C_text·t + b (C_text 1, so the
slope is k_gen·C_text), its R², the first-order fit, t₁ (I ≥ 0.95), peak memory, GPU temperature, clock, power.
The table is printed as Markdown rows; the last line is the JSON of all the figures.

The same full-size path can be forced anywhere, at a scale the machine holds (a smoke run of the code):
  --full-size        run the full-size part without CUDA too (on the CPU in fp32; the JSON says "smoke")
  --layers N         main transformer layers (default 30; the 2+2 refiner layers and dim 3840 are kept)
  --size PX          image side in pixels, a multiple of 16 (default 1024)
  --base-steps N     steps of the base rows at cfg 4 (default 30)
  --repeats N        alternating runs of the full-size overhead, at least 2 (default 10, 5 with --quick)
  --skip-nano        leave out the nano-turbo part (and the report's own time)
A CPU smoke run, a few minutes on 2 cores (its figures are not the GPU figures, and the JSON says so):
    .venv/bin/python -m bench.bench_kgen_probe --cpu --full-size --layers 1 --size 128 --base-steps 4 \\
        --repeats 2 --skip-nano
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import time

from bench import common

common.start_comfy()

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import torch  # noqa: E402
from comfyui_zimage.nodes import kgen_probe as kg  # noqa: E402

from bench import eval_nano  # noqa: E402
from nano import scenes  # noqa: E402

FULL_LAYERS, FULL_REFINER, FULL_SIZE_PX = 30, 2, 1024
TURBO, BASE = ("turbo", 8, 1.0), ("base", 30, 4.0)  # (variant, steps = NFE with res_multistep, cfg)
SAMPLER, THRESHOLD, C_TEXT = "res_multistep", 0.95, 1.0
RANDOM_WEIGHTS = ("random: seeded normal weights (fan-in scaled), not the released Z-Image weights; the times, "
                  "k_gen and memory are the architecture's, the convergence curve and fit are those of an untrained "
                  "network")


def sample(model, cond, uncond, latent, steps, cfg, sampler=SAMPLER):
    noise = comfy.sample.prepare_noise(latent, 0)
    common.sync()
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", cond, uncond, latent, seed=0, disable_pbar=True)
    common.sync()
    return time.perf_counter() - start, out


class ProbeClock:
    """Seconds spent in the probe's own code (per evaluation and at the ends of a run), measured directly: the
    difference of two noisy sampling medians cannot resolve a fraction of a percent on a shared CPU."""

    def __init__(self):
        self.seconds = 0.0
        self.originals = {}

    def wrap(self, owner, name):
        original = getattr(owner, name)
        self.originals[(owner, name)] = original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        setattr(owner, name, timed)

    def __enter__(self):
        self.wrap(kg.Probe, "evaluation")
        self.wrap(kg.Recording, "finish")
        self.wrap(kg.Telemetry, "start")
        return self

    def __exit__(self, *exc):
        for (owner, name), original in self.originals.items():
            setattr(owner, name, original)


def overhead(model, cond, uncond, latent, steps, cfg, repeats: int) -> dict:
    probed, record = kg.ZImageKGenProbe.execute(model).result
    sample(model, cond, uncond, latent, steps, cfg)  # warm-up both
    sample(probed, cond, uncond, latent, steps, cfg)
    plain, with_probe = [], []
    for _ in range(repeats):
        plain.append(sample(model, cond, uncond, latent, steps, cfg)[0])
        with_probe.append(sample(probed, cond, uncond, latent, steps, cfg)[0])
    clock_runs = min(5, repeats)
    with ProbeClock() as clock:
        probed_time = statistics.median([sample(probed, cond, uncond, latent, steps, cfg)[0] for _ in range(clock_runs)])
    half = repeats // 2
    return {"probe_code_fraction": round(clock.seconds / clock_runs / probed_time, 5), "repeats": repeats,
            "plain_median_s": round(statistics.median(plain), 5),
            "probe_median_s": round(statistics.median(with_probe), 5),
            "median_overhead": round(statistics.median(with_probe) / statistics.median(plain) - 1, 4),
            "noise": round(abs(statistics.median(plain[:half]) / statistics.median(plain[half:]) - 1), 4),
            "nfe_recorded": len(record.run.times)}


def nano_rows(model, clip, repeats: int) -> list[dict]:
    text = scenes.caption(scenes.random_group_scene(random.Random(1), held_out=True), "zh")
    cond, uncond = eval_nano.encode(clip, text, None), eval_nano.encode(clip, "", None)
    rows = []
    for batch in (1, 4):
        latent = torch.zeros(batch, 16, scenes.SIZE // 8, scenes.SIZE // 8)
        row = {"model": "nano-turbo", "size": scenes.SIZE, "batch": batch, "steps": 8, "cfg": 1.0,
               **overhead(model, cond, uncond, latent, 8, 1.0, repeats)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def report_seconds(model, clip, repeats: int = 5) -> float:
    """Time of the report itself (figures and plots; no history), after sampling: not part of the overhead."""
    cond, uncond = eval_nano.encode(clip, "红色圆形", None), eval_nano.encode(clip, "", None)
    probed, record = kg.ZImageKGenProbe.execute(model).result
    _, out = sample(probed, cond, uncond, torch.zeros(1, 16, 16, 16), 8, 1.0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        report = kg.make_report(record, out, 1.0, 0.95, True)
        kg.plot(report)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def table_entry(variant: str, steps: int, cfg: float, r: dict) -> dict:
    """One row of the k_gen table in the study's format, from the report's own figures."""
    fit = r.get("fit") or {}
    first = fit.get("first_order") or {}

    def rounded(value, digits=6):
        return None if value is None else float(f"{value:.{digits}g}")

    peak = r.get("peak_memory_bytes")
    return {"variant": variant, "label": r["label"], "weights": "random", "device": r["device"],
            "resolution": r["resolution"], "batch": r["batch"], "steps": steps, "cfg": cfg, "sampler": SAMPLER,
            "nfe": r["nfe"], "seconds": r["seconds"], "k_gen": r["k_gen"], "c_text": r["c_text"],
            "fit_k_gen_c_text": rounded(fit.get("k_gen_c_text")), "fit_intercept": rounded(fit.get("intercept")),
            "fit_r2": rounded(fit.get("r2"), 4), "fit_points": fit.get("points"),
            "first_order_k_gen_c_text": rounded(first.get("slope")), "first_order_r2": rounded(first.get("r2"), 4),
            "fit_error": fit.get("error"), "t1_s": rounded(r.get("t1_s")), "convergence_threshold": r["convergence_threshold"],
            "peak_memory_gib": round(peak / 2**30, 2) if peak else None,
            "temperature_c": r.get("temperature_c"), "sm_clock_mhz": r.get("sm_clock_mhz"), "power_w": r.get("power_w"),
            "completed": r["completed"]}


def markdown_table(table: list[dict]) -> list[str]:
    """The table as Markdown rows, for RESULTS.md."""
    def f(value, spec):
        return "–" if value is None else format(value, spec)

    lines = ["| variant | resolution | batch | cfg | NFE | Δt (s) | k_gen = NFE/Δt (s⁻¹) | fit k_gen·C_text (s⁻¹) | "
             "R² | first-order k (s⁻¹) | t₁ (s) | peak memory (GiB) | GPU °C | SM MHz | W |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in table:
        lines.append(f"| {e['variant']} | {e['resolution']} | {e['batch']} | {e['cfg']:g} | {e['nfe']} | "
                     f"{f(e['seconds'], '.3f')} | {f(e['k_gen'], '.3f')} | {f(e['fit_k_gen_c_text'], '.3f')} | "
                     f"{f(e['fit_r2'], '.3f')} | {f(e['first_order_k_gen_c_text'], '.3f')} | {f(e['t1_s'], '.3f')} | "
                     f"{f(e['peak_memory_gib'], '.2f')} | {f(e['temperature_c'], '.1f')} | "
                     f"{f(e['sm_clock_mhz'], '.0f')} | {f(e['power_w'], '.0f')} |")
    return lines


def full_size_rows(args, cuda: bool) -> dict:
    """The full-size architecture (random weights): the probe's overhead at batch 1 (turbo steps, cfg 1) and the
    k_gen table. On CUDA in bf16; elsewhere (--full-size) in fp32, as a smoke run of this same code."""
    from bench import bench_entropy_attention as bea  # the full-size model builder

    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = args.repeats or (5 if args.quick else 10)
    base = (BASE[0], args.base_steps, BASE[2])
    full_scale = cuda and args.layers == FULL_LAYERS and args.size == FULL_SIZE_PX and args.base_steps == BASE[1]
    info = {"weights": RANDOM_WEIGHTS, "layers": args.layers, "refiner_layers": FULL_REFINER,
            "dim": bea.FULL_SIZE["dim"], "size": args.size, "dtype": str(dtype).removeprefix("torch."),
            "sampler": SAMPLER, "turbo_steps": TURBO[1], "base_steps": base[1], "device": common.device_name(),
            "full_scale": full_scale}
    scale = f"{args.layers} of {FULL_LAYERS} layers, {args.size}², base {base[1]} steps, {info['dtype']}"
    if not cuda:
        info["smoke"] = (f"CPU smoke run of the full-size code path ({scale}): these figures are not the GPU "
                         "figures")
    elif not full_scale:
        info["smoke"] = f"reduced scale ({scale}): not the study's full-size figures"
    print(json.dumps({"full_size": info}), flush=True)

    model = bea.full_size_model(args.layers, FULL_REFINER, dtype)
    gen = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 32, bea.FULL_SIZE["cap_feat_dim"], generator=gen), {}]]
    uncond = [[torch.randn(1, 32, bea.FULL_SIZE["cap_feat_dim"], generator=gen), {}]]
    side = args.size // 8
    variant, steps, cfg = TURBO
    row = {"model": f"full-size (random weights, {args.layers} of {FULL_LAYERS} layers)", "size": args.size, "batch": 1,
           "steps": steps, "cfg": cfg,
           **overhead(model, cond, uncond, torch.zeros(1, 16, side, side), steps, cfg, repeats)}
    print(json.dumps(row), flush=True)
    table = []
    for variant, steps, cfg in (TURBO, base):
        for batch in (1, 4):
            probed, record = kg.ZImageKGenProbe.execute(model, f"full-size {variant} (random weights)").result
            latent = torch.zeros(batch, 16, side, side)
            sample(probed, cond, uncond, latent, 2, cfg)  # warm-up at this batch
            _, out = sample(probed, cond, uncond, latent, steps, cfg)
            r = kg.finite_figures(kg.make_report(record, out, C_TEXT, THRESHOLD, False))
            entry = table_entry(variant, steps, cfg, r)
            table.append(entry)
            print(json.dumps(entry), flush=True)
    if table:
        info["telemetry_unavailable"] = r.get("telemetry_unavailable")
    print("\n".join(markdown_table(table)), flush=True)
    return {"info": info, "overhead": [row], "table": table}


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "fewer repeats")
    common.add_cpu_option(ap)
    ap.add_argument("--full-size", action="store_true",
                    help="run the full-size part without CUDA too (a smoke run of its code; fp32 on the CPU)")
    ap.add_argument("--layers", type=int, default=FULL_LAYERS, help="main layers of the full-size model (default 30)")
    ap.add_argument("--size", type=int, default=FULL_SIZE_PX, help="full-size image side in pixels (default 1024)")
    ap.add_argument("--base-steps", type=int, default=BASE[1], help="steps of the base rows at cfg 4 (default 30)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="alternating runs of the full-size overhead (default 10, 5 with --quick; at least 2)")
    ap.add_argument("--skip-nano", action="store_true", help="leave out the nano-turbo part")
    args = ap.parse_args()
    cuda = mm.get_torch_device().type == "cuda"
    if args.layers < 1 or args.size < 16 or args.size % 16 or args.base_steps < 2 or (args.repeats or 2) < 2:
        ap.error("--layers ≥ 1, --size a multiple of 16, --base-steps ≥ 2 (a fit needs 2 intermediate points), "
                 "--repeats ≥ 2")
    if args.skip_nano and not (cuda or args.full_size):
        ap.error("--skip-nano leaves nothing to measure without CUDA or --full-size")
    torch.set_grad_enabled(False)
    started = time.time()
    figures = {"quick": args.quick}
    rows = []
    if not args.skip_nano:
        eval_nano.register_models()
        model, clip, _ = eval_nano.load("turbo")
        rows = nano_rows(model, clip, 20 if args.quick else 60)
        figures.update(nano=rows, report_s=report_seconds(model, clip))
        del model, clip
    if cuda or args.full_size:
        full = full_size_rows(args, cuda)
        figures.update(full_size=dict(full["info"], overhead=full["overhead"]), k_gen_table=full["table"])
        if "smoke" in full["info"]:
            figures["smoke"] = full["info"]["smoke"]
        full_rows = full["overhead"]
    else:
        full_rows = []
        figures["full_size"] = "not measured: no GPU (the full-size model needs one for a k_gen table; --full-size " \
                               "runs its code here at a small scale)"
    measured = rows + full_rows
    figures["overhead"] = max(r["probe_code_fraction"] for r in measured)
    figures["median_overhead"] = max(r["median_overhead"] for r in measured)
    figures["noise"] = max(r["noise"] for r in measured)
    figures.update(device=common.device_name(), machine=common.machine(), seconds=round(time.time() - started, 1))
    common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
