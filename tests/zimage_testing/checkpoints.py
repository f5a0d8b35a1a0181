"""Tiny randomly initialised Z-Image checkpoints in every format the loader reads, with the real key layouts.

The modules are ComfyUI's own classes (NextDiT with Z-Image modulation, its Llama/Qwen3 code, the
ldm AutoencoderKL encoder/decoder) at tiny sizes, so the key names are exactly those of the real files;
diffusers folders are written with diffusers' key names. (The hostile files are in bad_inputs.py.)

    PYTHONPATH=tests python -m zimage_testing OUT_DIR    (OUT_DIR gets diffusion_models/, text_encoders/, ...)
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from devtools.comfy_runtime import import_comfy

import_comfy(cpu=True)

import comfy.ops  # noqa: E402
import comfy.text_encoders.llama as llama  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from comfy.ldm.lumina.model import NextDiT  # noqa: E402
from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TINY_DIT = dict(patch_size=2, in_channels=16, dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
                axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
                time_scale=1000.0, pad_tokens_multiple=32)
TINY_QWEN3 = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32)  # >= 3 layers: Z-Image reads layer -2
TINY_VAE = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Small random weights (norm scales near 1) so a forward pass gives finite, varied output."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.05 * torch.randn(t.shape, generator=gen)
        elif name.endswith("pad_token"):
            value = 0.1 * torch.randn(t.shape, generator=gen)
        else:
            fan_in = t.shape[1] if t.ndim > 1 else 1
            for s in t.shape[2:]:
                fan_in *= s
            value = torch.randn(t.shape, generator=gen) / max(fan_in, 1) ** 0.5
        out[name] = value.contiguous()
    return out


def tiny_dit(seed=0, **overrides) -> dict[str, torch.Tensor]:
    sd = randomize(NextDiT(**{**TINY_DIT, **overrides}, operations=comfy.ops.disable_weight_init), seed)
    sd.pop("norm_final.weight", None)  # built by older NextDiT, never used, absent from the released files
    return sd


OMNI_SIGLIP_DIM = 48  # the real SigLIP features are 1152 wide


def tiny_omni_dit(seed=5) -> dict[str, torch.Tensor]:
    """The Z-Image Omni/Edit layout: the DiT plus a SigLIP feature embedder, refiner and pad token. Built with
    core's NextDiT where it has that layout, else with the same keys by hand (older core cannot build it)."""
    if "siglip_feat_dim" in inspect.signature(NextDiT.__init__).parameters:
        return tiny_dit(seed, siglip_feat_dim=OMNI_SIGLIP_DIM)
    sd = tiny_dit(seed)
    gen = torch.Generator().manual_seed(seed)
    dim = TINY_DIT["dim"]
    sd["siglip_embedder.0.weight"] = 1.0 + 0.05 * torch.randn(OMNI_SIGLIP_DIM, generator=gen)
    sd["siglip_embedder.1.weight"] = torch.randn(dim, OMNI_SIGLIP_DIM, generator=gen) / OMNI_SIGLIP_DIM ** 0.5
    sd["siglip_embedder.1.bias"] = torch.zeros(dim)
    sd["siglip_pad_token"] = 0.1 * torch.randn(1, dim, generator=gen)
    for k in [k for k in sd if k.startswith("context_refiner.")]:
        sd["siglip_refiner." + k[len("context_refiner."):]] = sd[k].clone()
    return sd


def tiny_qwen3(seed=1, **overrides) -> dict[str, torch.Tensor]:
    config = {**TINY_QWEN3, **overrides}
    cfg = llama.Qwen3_4BConfig(**{k: v for k, v in config.items() if k != "head_dim"})
    cfg.head_dim = config["head_dim"]
    model = torch.nn.Module()
    model.model = llama.Llama2_(cfg, device=None, dtype=torch.float32, ops=comfy.ops.disable_weight_init)
    sd = randomize(model, seed)
    # As in the real file, the vocabulary rows past the tokenizer's are unused: keep them zero.
    sd["model.embed_tokens.weight"][151669:] = 0
    return sd


def tiny_vae(seed=2, **overrides) -> dict[str, torch.Tensor]:
    cfg = {**TINY_VAE, **overrides}
    vae = torch.nn.Module()
    vae.encoder = Encoder(**cfg)
    vae.decoder = Decoder(**cfg)
    return randomize(vae, seed)


def tiny_sd15_unet() -> dict[str, torch.Tensor]:
    """An SD1.5 UNet that core's UNETLoader recognises (its detection keys on 320 model channels and a 768-wide
    context), cut to one level of one block, zero weights: a real non-Z-Image MODEL for the error tests."""
    import comfy.supported_models

    cfg = dict(comfy.supported_models.SD15.unet_config, in_channels=4, out_channels=4, num_res_blocks=[1],
               channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
               num_heads=8, use_spatial_transformer=True, legacy=False, image_size=32)
    unet = comfy.supported_models.SD15(cfg).get_model({}, "", device=torch.device("meta")).diffusion_model
    return {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in unet.state_dict().items()}


def cast(sd: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def quantizable(key: str, v: torch.Tensor) -> bool:
    """A Linear weight the fp8 formats store in fp8 (embedding and timestep-embedder layers stay high precision)."""
    return key.endswith(".weight") and v.ndim == 2 and "embed" not in key


def fp8_with_scale(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax scaling into float8_e4m3fn, as ComfyUI's QUANTIZATION.md describes it."""
    scale = (v.abs().max().clamp(min=1e-8) / 448.0).float()
    return (v / scale).to(torch.float8_e4m3fn), scale.reshape(())


def scaled_fp8(sd: dict, scale_input: bool = False) -> dict:
    """ComfyUI's old scaled-fp8 layout: fp8 Linear weights with a per-tensor `scale_weight` (and, with
    scale_input, the `scale_input` of 1 that conversion tools write when they did not calibrate inputs) and a
    `scaled_fp8` marker tensor."""
    out = {}
    for k, v in sd.items():
        if quantizable(k, v):
            layer = k[:-len(".weight")]
            out[k], out[layer + ".scale_weight"] = fp8_with_scale(v)
            if scale_input:
                out[layer + ".scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[k] = v.to(torch.bfloat16)
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def comfy_quant(config: dict) -> torch.Tensor:
    """A layer's `comfy_quant` tensor: its JSON quantisation config as uint8 bytes (ComfyUI's convert_old_quants)."""
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def mixed_precision_fp8(sd: dict, keep=()) -> dict:
    """Newer ComfyUI's mixed-precision layout: each quantised Linear holds its fp8 `weight`, a float32 `weight_scale`
    and a `comfy_quant` config ({"format": "float8_e4m3fn"}); layers whose name contains a `keep` word, and every
    other tensor, stay bf16."""
    out = {}
    for k, v in sd.items():
        if quantizable(k, v) and not any(word in k for word in keep):
            layer = k[:-len(".weight")]
            out[k], out[layer + ".weight_scale"] = fp8_with_scale(v)
            out[layer + ".comfy_quant"] = comfy_quant({"format": "float8_e4m3fn"})
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def dit_to_diffusers(sd: dict) -> dict:
    """ComfyUI NextDiT keys -> diffusers ZImageTransformer2DModel keys (splitting qkv), via ComfyUI's own table."""
    config = {"dim": sd["cap_embedder.1.weight"].shape[0],
              "n_layers": 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))),
              "n_refiner_layers": 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"noise_refiner\.(\d+)\.", k)))}
    out = {}
    for diffusers_key, target in comfy.utils.z_image_to_diffusers(config).items():
        if isinstance(target, tuple):
            name, (dim, offset, size) = target
            if name in sd:
                out[diffusers_key] = sd[name].narrow(dim, offset, size).clone()
        elif target in sd:
            out[diffusers_key] = sd[target]
    return out


VAE_TO_DIFFUSERS = [
    (r"^encoder\.down\.(\d)\.block\.(\d)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
    (r"^encoder\.down\.(\d)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
    (r"^decoder\.up\.(\d)\.block\.(\d)\.", lambda m: f"decoder.up_blocks.{3 - int(m[1])}.resnets.{m[2]}."),
    (r"^decoder\.up\.(\d)\.upsample\.", lambda m: f"decoder.up_blocks.{3 - int(m[1])}.upsamplers.0."),
    (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
    (r"\.mid\.attn_1\.norm\.", lambda m: ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", lambda m: f".mid_block.attentions.0.to_{m[1]}."),
    (r"\.mid\.attn_1\.proj_out\.", lambda m: ".mid_block.attentions.0.to_out.0."),
    (r"nin_shortcut", lambda m: "conv_shortcut"),
    (r"norm_out", lambda m: "conv_norm_out"),
]


def vae_to_diffusers(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for pattern, repl in VAE_TO_DIFFUSERS:
            k = re.sub(pattern, repl, k)
        if ".attentions.0.to_" in k and k.endswith("weight") and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[k] = v
    return out


def save(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def write_sharded(folder: Path, stem: str, sd: dict, shards: int) -> None:
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save(folder / name, part)
        weight_map.update({k: name for k in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_all(out: Path) -> dict[str, str]:
    """Write every fixture under `out` (a ComfyUI models folder). Returns {label: path}."""
    out = Path(out)
    dit, te, vae = tiny_dit(), tiny_qwen3(), tiny_vae()
    bf16_dit, bf16_te = cast(dit, torch.bfloat16), cast(te, torch.bfloat16)
    files = {
        "dit_bf16": save(out / "diffusion_models/tiny-zimage-turbo_bf16.safetensors", bf16_dit),
        "dit_fp16": save(out / "diffusion_models/tiny-zimage-base_fp16.safetensors", cast(dit, torch.float16)),
        "dit_fp32": save(out / "diffusion_models/tiny-zimage_fp32.safetensors", dit,
                         {"zimage.variant": "base"}),
        "dit_fp8": save(out / "diffusion_models/tiny-zimage-turbo_fp8_e4m3fn.safetensors",
                        {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and "embed" not in k else v.to(torch.bfloat16))
                         for k, v in dit.items()}),
        "dit_scaled_fp8": save(out / "diffusion_models/tiny-zimage-turbo_fp8_scaled.safetensors", scaled_fp8(dit)),
        "dit_omni": save(out / "diffusion_models/tiny-zimage-omni_bf16.safetensors",
                         cast(tiny_omni_dit(), torch.bfloat16), {"zimage.variant": "edit"}),
        "dit_mixed_fp8": save(out / "diffusion_models/tiny-zimage-turbo_mixed_fp8.safetensors",
                              mixed_precision_fp8(dit, keep=("final_layer",))),
        "te_bf16": save(out / "text_encoders/tiny-qwen3_bf16.safetensors", bf16_te),
        "te_fp16": save(out / "text_encoders/tiny-qwen3_fp16.safetensors", cast(te, torch.float16)),
        "te_fp32": save(out / "text_encoders/tiny-qwen3_fp32.safetensors", te),
        "te_fp8": save(out / "text_encoders/tiny-qwen3_fp8_e4m3fn.safetensors",
                       {k: v.to(torch.float8_e4m3fn) if quantizable(k, v) else v.to(torch.bfloat16)
                        for k, v in te.items()}),
        "te_scaled_fp8": save(out / "text_encoders/tiny-qwen3_fp8_scaled.safetensors", scaled_fp8(te, scale_input=True)),
        "te_mixed_fp8": save(out / "text_encoders/tiny-qwen3_mixed_fp8.safetensors",
                             mixed_precision_fp8(te, keep=("o_proj",))),
        "vae": save(out / "vae/tiny-ae.safetensors", vae),
        "aio": save(out / "checkpoints/tiny-zimage-turbo-aio.safetensors",
                    {**{"model.diffusion_model." + k: v for k, v in bf16_dit.items()},
                     **{"text_encoders.qwen3_4b.transformer." + k: v for k, v in bf16_te.items()},
                     **{"vae." + k: v for k, v in vae.items()}}),
    }
    folder = out / "diffusers/tiny-zimage-turbo-diffusers"
    write_sharded(folder / "transformer", "diffusion_pytorch_model", dit_to_diffusers(bf16_dit), shards=2)
    save(folder / "text_encoder/model.safetensors",
         {**bf16_te, "lm_head.weight": bf16_te["model.embed_tokens.weight"].clone()})
    save(folder / "vae/diffusion_pytorch_model.safetensors", vae_to_diffusers(vae))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    files["diffusers"] = folder

    # Broken inputs for the error tests.
    truncated = out / "diffusion_models/broken-truncated.safetensors"
    data = files["dit_bf16"].read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    files["truncated"] = truncated
    corrupt = out / "diffusion_models/broken-corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    files["corrupt"] = corrupt
    files["sd15"] = save(out / "diffusion_models/not-zimage-sd15.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.middle_block.0.in_layers.0.weight": torch.zeros(8),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 8)})
    files["flux"] = save(out / "diffusion_models/not-zimage-flux.safetensors", {
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
        "single_blocks.0.linear1.weight": torch.zeros(24, 8), "img_in.weight": torch.zeros(8, 64)})
    files["sd15_unet"] = save(out / "diffusion_models/sd15-unet-tiny_fp16.safetensors", tiny_sd15_unet())
    files["te_wide"] = save(out / "text_encoders/tiny-qwen3-wide_bf16.safetensors",
                            cast(tiny_qwen3(hidden_size=96, intermediate_size=128), torch.bfloat16))
    files["no_te_fits"] = save(out / "checkpoints/broken-no-text-encoder.safetensors",
                               {"model.diffusion_model." + k: v
                                for k, v in cast(tiny_dit(cap_feat_dim=40), torch.bfloat16).items()})
    incomplete = out / "diffusers/broken-no-vae"
    write_sharded(incomplete / "transformer", "diffusion_pytorch_model", dit_to_diffusers(bf16_dit), shards=1)
    save(incomplete / "text_encoder/model.safetensors", bf16_te)
    files["no_vae_folder"] = incomplete
    pickled = out / "diffusion_models/old-model.ckpt"
    pickled.write_bytes(b"not loaded: pickle files are refused")
    files["ckpt"] = pickled
    return {k: str(v) for k, v in files.items()}
