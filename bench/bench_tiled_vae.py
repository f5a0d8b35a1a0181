"""Tiled VAE benchmark: core VAEDecode, core VAEDecodeTiled (512 px, 64 overlap) and ours, side by side in one process.

    .venv/bin/python -m bench.bench_tiled_vae [--quick] [--tile 512] [--fp32] [--sizes 2048 4096] [--nano-sizes 1024]
    .venv/bin/python -m bench.bench_tiled_vae --profile --sizes 1024     # where the time goes (torch.profiler)

Two VAEs: the shipped, trained nano VAE (decoding latents of real pictures of its domain, encoded by it) and
the full-size Flux/Z-Image VAE architecture (ch 128, ch_mult 1-2-4-4, 2 res blocks; random weights, random
latents). Sizes: 1024² and 2048² (and 4096² on a GPU) with 512 px tiles; --quick: 512² and 1024² for nano,
384² for the full-size one (this 2-core machine needs minutes per full-size decode), with 256 px tiles.
Errors are against core's full decode, in 8-bit steps (x255). Peak memory is above what was in use before the
call: CUDA's allocator peak on a GPU, the process's RSS high-water mark (reset through /proc/self/clear_refs,
with glibc told to return freed blocks) on the CPU. The last line is the JSON of the figures.

--sizes replaces the full-size VAE's sizes, --nano-sizes the nano VAE's. --profile measures no figures: on the
full-size VAE at each size it runs one decode of ours and one of core's tiled decode under torch.profiler (after an
unprofiled warm-up of both at 128² in 64 px tiles) and prints the top ops by self time (CPU, and CUDA on a GPU) of
each, and our decode's time by phase: the GroupNorm statistics passes, the GroupNorm+SiLU application, the
convolutions, the upsampling, the global attention, and what the runner does around them (copies, residual adds).
Phase times are exclusive (a phase's nested phases are subtracted), from CUDA events on a GPU (no added
synchronisation), the clock on the CPU. Its last line is the JSON of the profile.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import platform
import random
import sys
import time

from bench import common
from devtools.comfy_runtime import REPO_ROOT

common.start_comfy()
common.import_test_fixtures()

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import nodes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from comfyui_zimage.nodes import tiled_vae as tv  # noqa: E402
from comfyui_zimage.nodes.tiled_vae import tiled_decode  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from zimage_testing.checkpoints import TINY_VAE, tiny_vae  # noqa: E402

from nano import scenes  # noqa: E402

FLUX = dict(TINY_VAE, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2)


def nano_vae():
    path = REPO_ROOT / "models" / "vae" / "nano_ae.safetensors"
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["zimage.config"])
    return make(load_file(str(path)), cfg)


def flux_vae():
    sd = tiny_vae(7, **FLUX)
    z = FLUX["z_channels"]
    sd.update({"quant_conv.weight": torch.eye(2 * z)[:, :, None, None], "quant_conv.bias": torch.zeros(2 * z),
               "post_quant_conv.weight": torch.eye(z)[:, :, None, None], "post_quant_conv.bias": torch.zeros(z)})
    return make(sd, FLUX)


def make(sd, cfg):
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": cfg, "embed_dim": cfg["z_channels"]}})
    vae.latent_channels = cfg["z_channels"]
    return vae


def picture_latent(vae, side: int) -> torch.Tensor:
    """A picture of the nano domain at `side` px, encoded by the VAE: a latent a sampler could have made."""
    rng = random.Random(side)
    img = scenes.render(scenes.random_edit_pair(rng).before, size=side)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    return vae.encode(pixels)


def track_freed_memory() -> None:
    """Make glibc hand every large freed block back to the OS, so the RSS high-water mark measures live
    tensors rather than what the allocator kept for reuse (its default threshold adapts upwards to 32 MB)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: blocks from 64 KiB up come from (and go back by) mmap
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


def measure(fn):
    """(result, seconds, peak bytes above the memory in use before the call)."""
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        common.reset_peak_rss()
        before = common.rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else common.rss_kib("VmHWM") * 1024) - before
    return out.float().cpu(), seconds, max(0, peak)


def run_size(name, vae, z, tile):
    side = z.shape[-1] * 8
    core_full = lambda: nodes.VAEDecode().decode(vae, {"samples": z})[0]  # noqa: E731
    core_tiled = lambda: nodes.VAEDecodeTiled().decode(vae, {"samples": z}, tile, 64, 64, 8)[0]  # noqa: E731
    ours = lambda: tiled_decode(vae, z, tile_size=str(tile))  # noqa: E731
    full, t_full, m_full = measure(core_full)
    tiled, t_tiled, m_tiled = measure(core_tiled)
    mine, t_mine, m_mine = measure(ours)

    def err(x):
        d = (x - full).abs() * 255
        return round(d.max().item(), 4), round(d.mean().item(), 5)

    row = {"vae": name, "size": side, "tile": tile,
           "core_full_s": round(t_full, 2), "core_tiled_s": round(t_tiled, 2), "ours_s": round(t_mine, 2),
           "core_full_peak_mb": round(m_full / 2**20), "core_tiled_peak_mb": round(m_tiled / 2**20),
           "ours_peak_mb": round(m_mine / 2**20),
           "core_tiled_err_255": err(tiled), "ours_err_255": err(mine),
           "time_ratio_vs_core_tiled": round(t_mine / t_tiled, 3), "time_ratio_vs_full": round(t_mine / t_full, 3),
           "mem_ratio_vs_full": round(m_mine / max(1, m_full), 3)}
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------------------------------------
# --profile: where the time goes, ours against core's tiled decode.

class Phases:
    """Exclusive time per phase of our decode, from wrappers around the tiled VAE module's functions.

    Each wrapped call is also a torch.profiler record_function range (named zimage::<phase>), so the trace shows
    the phases too. On a GPU the times are CUDA events (no synchronisation added), on the CPU the clock."""

    def __init__(self, cuda: bool):
        self.cuda, self.stack, self.roots = cuda, [], []

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            node = {"name": name, "children": []}
            (self.stack[-1]["children"] if self.stack else self.roots).append(node)
            self.stack.append(node)
            node["t0"] = self.now()
            try:
                with torch.profiler.record_function(f"zimage::{name}"):
                    return fn(*args, **kwargs)
            finally:
                node["t1"] = self.now()
                self.stack.pop()
        return timed

    def seconds(self, node) -> float:
        if self.cuda:
            return node["t0"].elapsed_time(node["t1"]) / 1000
        return node["t1"] - node["t0"]

    def table(self) -> dict:
        """{phase: {calls, inclusive_s, exclusive_s}}, summed over every call."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}

        def visit(node):
            inclusive = self.seconds(node)
            children = sum(visit(child) for child in node["children"])
            row = out.setdefault(node["name"], {"calls": 0, "inclusive_s": 0.0, "exclusive_s": 0.0})
            row["calls"] += 1
            row["inclusive_s"] += inclusive
            row["exclusive_s"] += inclusive - children
            return inclusive

        for root in self.roots:
            visit(root)
        return {k: {"calls": v["calls"], "inclusive_s": round(v["inclusive_s"], 3), "exclusive_s": round(v["exclusive_s"], 3)}
                for k, v in sorted(out.items(), key=lambda kv: -kv[1]["exclusive_s"])}


@contextlib.contextmanager
def phases_of_our_decode(phases: Phases):
    """Wrap the phases of nodes/tiled_vae.py (its functions look each other up as module globals, so patching
    the module's attributes reaches every call), and put them back afterwards."""
    orig = {name: getattr(tv, name) for name in ("decode_exact", "resnet_block", "stats_of", "materialise",
                                                  "global_attention", "upsample_nearest", "norm_silu")}
    methods = {(tv.GroupStats, "add"): tv.GroupStats.add, (tv.Conv, "apply"): tv.Conv.apply}
    norm_silu = orig["norm_silu"]
    try:
        tv.decode_exact = phases.wrap("decode_exact: latent-res middle, conv_out tiles, copies", orig["decode_exact"])
        tv.resnet_block = phases.wrap("resnet_block: tile reads, residual adds, copies", orig["resnet_block"])
        tv.stats_of = phases.wrap("stats pass of a level's first input (recomputes its upsample conv)",
                                  orig["stats_of"])
        tv.materialise = phases.wrap("materialise", orig["materialise"])
        tv.global_attention = phases.wrap("global attention (mid block, whole latent)", orig["global_attention"])
        tv.upsample_nearest = phases.wrap("nearest 2x upsampling", orig["upsample_nearest"])
        tv.norm_silu = lambda norm, stats: phases.wrap("GroupNorm apply + SiLU (fp32)", norm_silu(norm, stats))
        tv.GroupStats.add = phases.wrap("GroupNorm statistics (var_mean per tile, fp64 merge)", methods[(tv.GroupStats, "add")])
        tv.Conv.apply = phases.wrap("conv (pad, 3x3/1x1 conv, trim)", methods[(tv.Conv, "apply")])
        yield
    finally:
        for name, fn in orig.items():
            setattr(tv, name, fn)
        for (cls, name), fn in methods.items():
            setattr(cls, name, fn)


def top_ops(prof, key: str, n: int) -> list[dict]:
    """The n ops with the most self time by `key` (self_cpu_time_total, or the device's), in ms."""
    rows = []
    events = [e for e in prof.key_averages() if not e.key.startswith("zimage::")]
    for e in sorted(events, key=lambda e: -getattr(e, key, 0))[:n]:
        value = getattr(e, key, 0)
        if value <= 0:
            break
        rows.append({"op": e.key, "calls": e.count, "self_ms": round(value / 1000, 1)})
    return rows


def device_key(prof) -> str | None:
    """The averages' attribute for self time on the GPU (renamed from cuda to device in newer torch)."""
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        if any(getattr(e, key, 0) > 0 for e in averages):
            return key
    return None


def profile_one(label: str, fn, cuda: bool, rows: int):
    """Run fn once under torch.profiler; print its tables; return (seconds, {cpu: [...], cuda: [...]})."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    gc.collect()
    common.sync()
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        common.sync()
        seconds = time.perf_counter() - start
    print(f"\n=== {label}: {seconds:.2f} s under the profiler ===", flush=True)
    out = {"cpu": top_ops(prof, "self_cpu_time_total", rows)}
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    if cuda and (key := device_key(prof)):
        out["cuda"] = top_ops(prof, key, rows)
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
    return seconds, out


def run_profile(sizes: list[int], tile: int, rows: int) -> dict:
    cuda = mm.get_torch_device().type == "cuda"
    flux = flux_vae()
    gen = torch.Generator().manual_seed(0)
    ours = lambda z: tiled_decode(flux, z, tile_size=str(tile))  # noqa: E731
    core = lambda z: nodes.VAEDecodeTiled().decode(flux, {"samples": z}, tile, 64, 64, 8)[0]  # noqa: E731
    small = torch.randn(1, 16, 16, 16, generator=gen)  # warm-up, tiled (64 px): the VAE on the device, the
    nodes.VAEDecodeTiled().decode(flux, {"samples": small}, 64, 64, 32, 8)  # cuDNN/oneDNN handles, first kernels
    tiled_decode(flux, small, tile_size="64")
    result = {"profile": True, "tile": int(tile), "vae_dtype": str(flux.vae_dtype).removeprefix("torch."),
              "machine": f"{platform.machine()}, {common.device_name()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}", "sizes": {}}
    for side in sizes:
        z = torch.randn(1, 16, side // 8, side // 8, generator=gen)
        phases = Phases(cuda)
        with phases_of_our_decode(phases):
            t_ours, ops_ours = profile_one(f"ours at {side}² (tile {tile})", lambda z=z: ours(z), cuda, rows)
        table = phases.table()
        print(f"\n=== ours at {side}²: time by phase (exclusive; total {t_ours:.2f} s) ===", flush=True)
        for name, row in table.items():
            print(f"{row['exclusive_s']:9.3f} s  {100 * row['exclusive_s'] / t_ours:5.1f} %  {row['calls']:6d} calls  {name}",
                  flush=True)
        t_core, ops_core = profile_one(f"core VAEDecodeTiled at {side}² (tile {tile}, overlap 64)", lambda z=z: core(z),
                                       cuda, rows)
        print(f"\n=== {side}²: ours {t_ours:.2f} s, core tiled {t_core:.2f} s, ratio {t_ours / t_core:.3f} "
              "(both under the profiler) ===", flush=True)
        result["sizes"][str(side)] = {"ours_s": round(t_ours, 2), "core_tiled_s": round(t_core, 2),
                                      "ratio_vs_core_tiled": round(t_ours / t_core, 3), "ours_phases": table,
                                      "ours_top_ops": ops_ours, "core_tiled_top_ops": ops_core}
    return result


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "smaller sizes (minutes on a 2-core CPU)")
    ap.add_argument("--tile", type=int, default=0,
                    help="tile size in pixels for core's tiled decode and ours (default 512; 256 with --quick, so the "
                         "small images are still cut into tiles)")
    common.add_cpu_option(ap)
    ap.add_argument("--fp32", action="store_true",
                    help="decode in float32 on a GPU too (ComfyUI's --fp32-vae), to tell tiling error from bf16 rounding")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="the full-size VAE's image sides in pixels (multiples of 8; default 1024 2048, and 4096 on a "
                         "GPU; 384 with --quick)")
    ap.add_argument("--nano-sizes", type=int, nargs="+", default=None,
                    help="the nano VAE's image sides in pixels (default 1024 2048; 512 1024 with --quick)")
    ap.add_argument("--profile", action="store_true",
                    help="no figures: profile one decode of ours and one of core's tiled decode (full-size VAE, at "
                         "--sizes, default 1024) with torch.profiler; top ops by self time and our time by phase")
    ap.add_argument("--profile-rows", type=int, default=15, help="ops in each --profile table (default 15)")
    args = ap.parse_args()
    for flag, sizes in (("--sizes", args.sizes), ("--nano-sizes", args.nano_sizes)):
        if sizes and any(s % 8 or s < 64 for s in sizes):
            ap.error(f"{flag}: each side must be a multiple of 8, at least 64")
    if args.fp32:
        from comfy.cli_args import args as comfy_args
        comfy_args.fp32_vae = True
    gpu = mm.get_torch_device().type == "cuda"
    args.tile = args.tile or (256 if args.quick else 512)
    if args.quick:
        nano_sizes, flux_sizes = [512, 1024], [384]
    else:
        nano_sizes, flux_sizes = [1024, 2048], [1024, 2048] + ([4096] if gpu else [])
    flux_sizes, nano_sizes = args.sizes or flux_sizes, args.nano_sizes or nano_sizes
    torch.set_grad_enabled(False)
    if args.profile:
        common.print_figures(run_profile(args.sizes or [1024], args.tile, args.profile_rows))
        return 0
    if not gpu:
        track_freed_memory()
    rows = []
    nano = nano_vae()
    for side in nano_sizes:
        rows.append(run_size("nano", nano, picture_latent(nano, side), args.tile))
    flux = flux_vae()
    gen = torch.Generator().manual_seed(0)
    for side in flux_sizes:
        rows.append(run_size("flux-full-size", flux, torch.randn(1, 16, side // 8, side // 8, generator=gen), args.tile))
    nano_big = [r for r in rows if r["vae"] == "nano"][-1]
    flux_big = [r for r in rows if r["vae"] != "nano"][-1]
    figures = {
        "max_err_255": nano_big["ours_err_255"][0], "mean_err_255": nano_big["ours_err_255"][1],
        "core_tiled_max_err_255": nano_big["core_tiled_err_255"][0],
        "core_tiled_mean_err_255": nano_big["core_tiled_err_255"][1],
        "full_size_max_err_255": flux_big["ours_err_255"][0], "full_size_mean_err_255": flux_big["ours_err_255"][1],
        "mem_ratio_vs_full": flux_big["mem_ratio_vs_full"], "time_ratio_vs_core_tiled": flux_big["time_ratio_vs_core_tiled"],
        "measured_at": f"nano {nano_big['size']}², full-size {flux_big['size']}², tile {args.tile}",
        "rows": rows, "quick": args.quick, "vae_dtype": str(nano.vae_dtype).removeprefix("torch."),
        "machine": f"{platform.machine()}, {'cuda ' + torch.cuda.get_device_name() if gpu else 'cpu'}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    common.print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
