"""k_gen probe overhead: sampling with and without the probe, side by side in one process.

    .venv/bin/python -m bench.bench_kgen_probe [--quick] [--cpu]

On the shipped nano-turbo (8 steps, cfg 1, res_multistep, 128², batch 1 and 4): runs with and without the
probe alternate, and `overhead` is the ratio of their median times minus 1. `noise` is the same figure
between the two halves of the unprobed runs, the smallest overhead this machine can tell from zero.
On a GPU, also the full-size Z-Image architecture (30 layers, dim 3840, bf16, random weights) at 1024²:
the overhead there, and a k_gen table in the study's format (turbo 8 NFE at cfg 1, base 30 NFE at cfg 4;
batch 1 and 4) made by the probe and report themselves. The last line is the JSON of the figures.
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


def sample(model, cond, uncond, latent, steps, cfg, sampler="res_multistep"):
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
        self.wrap(kg.Run, "finish")
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
    with ProbeClock() as clock:
        probed_time = statistics.median([sample(probed, cond, uncond, latent, steps, cfg)[0] for _ in range(5)])
    half = repeats // 2
    return {"probe_code_fraction": round(clock.seconds / 5 / probed_time, 5), "repeats": repeats,
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


def gpu_rows(repeats: int) -> tuple[list[dict], list[dict]]:
    from bench import bench_entropy_attention as bea  # the full-size model builder

    model = bea.full_size_model(30, 2, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 32, bea.FULL_SIZE["cap_feat_dim"], generator=gen), {}]]
    uncond = [[torch.randn(1, 32, bea.FULL_SIZE["cap_feat_dim"], generator=gen), {}]]
    device_name = torch.cuda.get_device_name()
    overhead_rows, table = [], []
    latent = torch.zeros(1, 16, 128, 128)
    row = {"model": "full-size (random weights)", "size": 1024, "batch": 1, "steps": 8, "cfg": 1.0,
           **overhead(model, cond, uncond, latent, 8, 1.0, repeats)}
    overhead_rows.append(row)
    print(json.dumps(row), flush=True)
    for variant, steps, cfg in (("turbo", 8, 1.0), ("base", 30, 4.0)):
        for batch in (1, 4):
            probed, record = kg.ZImageKGenProbe.execute(model, f"full-size {variant} (random weights)").result
            latent = torch.zeros(batch, 16, 128, 128)
            sample(probed, cond, uncond, latent, 2, cfg)  # warm-up at this batch
            _, out = sample(probed, cond, uncond, latent, steps, cfg)
            r = kg.make_report(record, out, 1.0, 0.95, False)
            entry = {"variant": variant, "gpu": device_name, "batch": batch, "nfe": r["nfe"], "seconds": r["seconds"],
                     "k_gen": r["k_gen"], "temperature_c": r.get("temperature_c"),
                     "peak_memory_gib": round(r["peak_memory_bytes"] / 2**30, 2) if r.get("peak_memory_bytes") else None}
            table.append(entry)
            print(json.dumps(entry), flush=True)
    return overhead_rows, table


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "fewer repeats")
    common.add_cpu_option(ap)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    eval_nano.register_models()
    started = time.time()
    repeats = 20 if args.quick else 60
    model, clip, _ = eval_nano.load("turbo")
    rows = nano_rows(model, clip, repeats)
    figures = {"quick": args.quick, "nano": rows, "report_s": report_seconds(model, clip)}
    if mm.get_torch_device().type == "cuda":
        gpu_overhead, table = gpu_rows(5 if args.quick else 10)
        figures.update(full_size=gpu_overhead, k_gen_table=table)
        figures["overhead"] = max(r["probe_code_fraction"] for r in rows + gpu_overhead)
    else:
        figures["overhead"] = max(r["probe_code_fraction"] for r in rows)
        figures["full_size"] = "not measured: no GPU (the full-size model needs one for a k_gen table)"
    figures["median_overhead"] = max(r["median_overhead"] for r in rows)
    figures["noise"] = max(r["noise"] for r in rows)
    figures.update(device=common.device_name(), machine=common.machine(), seconds=round(time.time() - started, 1))
    common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
