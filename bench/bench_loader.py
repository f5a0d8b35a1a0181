"""Loader benchmark: core UNETLoader + CLIPLoader + VAELoader vs the Z-Image Checkpoint Loader, same files, one process.

    .venv/bin/python -m bench.bench_loader [--quick] [--repeats N]

The files are real-width split files that core can load: a Z-Image DiT at dim 3840 (fewer layers than the
6B model's 30 so it fits this machine), the full Qwen3-4B text encoder (core builds only that size) and the
full Flux VAE. Weights are random. Files are read once beforehand so both loaders start from the page cache.
Peak RSS is the process's high-water mark (reset through /proc/self/clear_refs) above the RSS before loading,
divided by the bytes of the loaded models' tensors. The last line is the JSON of the figures.
"""
from __future__ import annotations

import gc
import json
import platform
import tempfile
import time
from pathlib import Path

from bench import common

common.start_comfy(cpu=True)

import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.text_encoders.llama as llama  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
import torch  # noqa: E402
from comfy.ldm.lumina.model import NextDiT  # noqa: E402
from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402
from comfyui_zimage.nodes.loader import ZImageCheckpointLoader  # noqa: E402

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def write_safetensors(path: Path, shapes: dict[str, tuple], dtype: torch.dtype) -> int:
    """Stream a safetensors file of random-valued tensors without holding it in memory."""
    block = torch.randn(1 << 22).to(dtype).view(torch.uint8).numpy().tobytes()  # 4 Mi values, tiled
    itemsize = torch.tensor([], dtype=dtype).element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = itemsize
        for s in shape:
            n *= s
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        remaining = offset
        while remaining:
            chunk = block[: min(len(block), remaining)]
            f.write(chunk)
            remaining -= len(chunk)
    return offset


def meta_shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def make_files(models: Path, n_layers: int, n_refiner: int) -> dict[str, int]:
    with torch.device("meta"):
        dit = NextDiT(patch_size=2, in_channels=16, dim=3840, n_layers=n_layers, n_refiner_layers=n_refiner, n_heads=30,
                      n_kv_heads=30, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                      cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                      z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                      operations=comfy.ops.disable_weight_init)
        te = torch.nn.Module()
        te.model = llama.Llama2_(llama.Qwen3_4BConfig(), device="meta", dtype=torch.bfloat16,
                                 ops=comfy.ops.disable_weight_init)
        vae = torch.nn.Module()
        cfg = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                   num_res_blocks=2, attn_resolutions=[], dropout=0.0)
        vae.encoder, vae.decoder = Encoder(**cfg), Decoder(**cfg)
    dit_shapes = meta_shapes(dit)
    dit_shapes.pop("norm_final.weight")
    sizes = {}
    for kind, name, shapes, dtype in (("diffusion_models", "bench-zimage-turbo_bf16.safetensors", dit_shapes, torch.bfloat16),
                                      ("text_encoders", "bench-qwen_3_4b.safetensors", meta_shapes(te), torch.bfloat16),
                                      ("vae", "bench-ae.safetensors", meta_shapes(vae), torch.float32)):
        (models / kind).mkdir(parents=True, exist_ok=True)
        sizes[kind] = write_safetensors(models / kind / name, shapes, dtype)
        folder_paths.add_model_folder_path(kind, str(models / kind))
    return sizes


def tensor_bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def touch(*modules) -> None:
    """Read one value per memory page of every tensor, so lazily mapped weights are really in memory."""
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            flat = t.detach().reshape(-1)
            flat[:: max(1, 4096 // t.element_size())].float().sum()


def measure(load) -> dict:
    gc.collect()
    before = common.rss_kib()
    common.reset_peak_rss()
    start = time.perf_counter()
    model, clip, vae = load()
    touch(model.model, clip.cond_stage_model, vae.first_stage_model)  # a lazy load must pay its reads here
    elapsed = time.perf_counter() - start
    peak = common.rss_kib("VmHWM")
    loaded = tensor_bytes(model.model, clip.cond_stage_model, vae.first_stage_model)
    dtypes = [str(next(m.parameters()).dtype) for m in (model.model.diffusion_model, clip.cond_stage_model,
                                                         vae.first_stage_model)]
    del model, clip, vae
    gc.collect()
    return {"time_s": elapsed, "peak_rss_bytes": (peak - before) * 1024, "loaded_bytes": loaded, "dtypes": dtypes}


def load_core():
    model = nodes.UNETLoader().load_unet("bench-zimage-turbo_bf16.safetensors", "default")[0]
    clip = nodes.CLIPLoader().load_clip("bench-qwen_3_4b.safetensors", type="lumina2")[0]
    vae = nodes.VAELoader().load_vae("bench-ae.safetensors")[0]
    return model, clip, vae


def load_ours():
    out = ZImageCheckpointLoader.execute("diffusion_models/bench-zimage-turbo_bf16.safetensors",
                                         "bench-qwen_3_4b.safetensors", "bench-ae.safetensors", "default", "default")
    return out.args[:3]


def main() -> None:
    parser = common.parser(__doc__, "1 DiT layer and 1 repeat (a few minutes here)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    # Two refiner layers as in the real model: core's detection assumes that number.
    n_layers, n_refiner, repeats = (1, 2, 1) if args.quick else (4, 2, 2)
    repeats = args.repeats or repeats
    comfy.model_management.unload_all_models()

    with tempfile.TemporaryDirectory(prefix="zimage-bench-loader-") as tmp:
        models = Path(tmp)
        t0 = time.perf_counter()
        sizes = make_files(models, n_layers, n_refiner)
        print(f"wrote {sum(sizes.values()) / 2**30:.2f} GiB of files in {time.perf_counter() - t0:.0f} s: "
              + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sizes.items()), flush=True)
        for path in models.rglob("*.safetensors"):  # into the page cache, so neither loader pays the disk
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
        runs = {"core": [], "ours": []}
        for i in range(repeats):
            for name, load in (("core", load_core), ("ours", load_ours)):
                r = measure(load)
                runs[name].append(r)
                print(f"run {i + 1} {name:4s}: {r['time_s']:.2f} s, peak RSS +{r['peak_rss_bytes'] / 2**30:.2f} GiB for "
                      f"{r['loaded_bytes'] / 2**30:.2f} GiB of loaded tensors {r['dtypes']}", flush=True)

    best = {k: min(v, key=lambda r: r["time_s"]) for k, v in runs.items()}
    peak = {k: max(r["peak_rss_bytes"] for r in v) for k, v in runs.items()}
    result = {
        "bench": "loader",
        "quick": args.quick,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU",
        "dit_layers": n_layers, "dit_refiner_layers": n_refiner,
        "file_bytes": sum(sizes.values()),
        "loaded_bytes": best["ours"]["loaded_bytes"],
        "core_time_s": round(best["core"]["time_s"], 3),
        "ours_time_s": round(best["ours"]["time_s"], 3),
        "load_time_ratio": round(best["ours"]["time_s"] / best["core"]["time_s"], 3),
        "core_peak_rss_ratio": round(peak["core"] / best["core"]["loaded_bytes"], 3),
        "peak_rss_ratio": round(peak["ours"] / best["ours"]["loaded_bytes"], 3),
    }
    common.print_figures(result)


if __name__ == "__main__":
    main()
