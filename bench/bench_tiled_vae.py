"""Tiled VAE benchmark: core VAEDecode, core VAEDecodeTiled (512 px, 64 overlap) and ours, side by side in one process.

    .venv/bin/python -m bench.bench_tiled_vae [--quick] [--tile 512]

Two VAEs: the shipped, trained nano VAE (decoding latents of real pictures of its domain, encoded by it) and
the full-size Flux/Z-Image VAE architecture (ch 128, ch_mult 1-2-4-4, 2 res blocks; random weights, random
latents). Sizes: 1024² and 2048² (and 4096² on a GPU) with 512 px tiles; --quick: 512² and 1024² for nano,
384² for the full-size one (this 2-core machine needs minutes per full-size decode), with 256 px tiles.
Errors are against core's full decode, in 8-bit steps (x255). Peak memory is above what was in use before the
call: CUDA's allocator peak on a GPU, the process's RSS high-water mark (reset through /proc/self/clear_refs,
with glibc told to return freed blocks) on the CPU. The last line is the JSON of the figures.
"""
from __future__ import annotations

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


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "smaller sizes (minutes on a 2-core CPU)")
    ap.add_argument("--tile", type=int, default=0,
                    help="tile size in pixels for core's tiled decode and ours (default 512; 256 with --quick, so the "
                         "small images are still cut into tiles)")
    common.add_cpu_option(ap)
    ap.add_argument("--fp32", action="store_true",
                    help="decode in float32 on a GPU too (ComfyUI's --fp32-vae), to tell tiling error from bf16 rounding")
    args = ap.parse_args()
    if args.fp32:
        from comfy.cli_args import args as comfy_args
        comfy_args.fp32_vae = True
    gpu = mm.get_torch_device().type == "cuda"
    args.tile = args.tile or (256 if args.quick else 512)
    if args.quick:
        nano_sizes, flux_sizes = [512, 1024], [384]
    else:
        nano_sizes, flux_sizes = [1024, 2048], [1024, 2048] + ([4096] if gpu else [])
    torch.set_grad_enabled(False)
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
