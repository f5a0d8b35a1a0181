"""What a Z-Image file holds: safetensors headers, key layouts and the model sizes they imply, and the load plan
the loader builds from them.

Everything here works on tensor names and shapes alone (no ComfyUI, no weights read), so the loader
can check a file completely before it reads a byte of weights, and unit tests can call it directly.
The same code reads the nano files and the real 6B files: every size is inferred from shapes.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ZImageError

# Prefixes under which an all-in-one checkpoint stores each part (ComfyUI's own save layout first).
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
TEXT_ENCODER_PREFIXES = ("text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_4b.", "text_encoder.",
                         "cond_stage_model.", "")
VAE_PREFIXES = ("vae.", "first_stage_model.", "")

# Recommended sampling per variant: what the official ComfyUI workflows use (turbo: 9 steps of res_multistep at
# cfg 1, which the k_gen report counts as 9 NFEs; base: CFG with a negative prompt; edit: reference-guided).
SAMPLING_SETTINGS = {
    "turbo": {"steps": 9, "cfg": 1.0, "shift": 3.0, "sampler": "res_multistep", "scheduler": "simple"},
    "base": {"steps": 30, "cfg": 4.0, "shift": 3.0, "sampler": "res_multistep", "scheduler": "simple"},
    "edit": {"steps": 20, "cfg": 4.0, "shift": 3.0, "sampler": "res_multistep", "scheduler": "simple"},
}
VARIANTS = tuple(SAMPLING_SETTINGS)

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


class ZImageFileError(ZImageError):
    """A file that cannot be used, with a message that names it, says what is wrong and how to fix it."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class SafetensorsHeader:
    """The header of one .safetensors file, checked against the file's size."""
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse a .safetensors header without reading tensor data; refuse anything else with a clear error."""
    path = Path(path)
    name = path.name
    if path.suffix.lower() != ".safetensors":
        raise ZImageFileError(f"{name}: only .safetensors files are loaded (pickle-based .ckpt/.pt/.bin files can "
                              "run code when opened). Convert it to .safetensors or pick another file.")
    if not path.is_file():
        raise ZImageFileError(f"{name}: file not found. Put it in your ComfyUI models folder and refresh.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ZImageFileError(f"{name}: the file is empty or truncated ({size} bytes); download it again.")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, 100 << 20):
            raise ZImageFileError(f"{name}: not a valid safetensors file (header length {header_len} does not fit in "
                                  f"{size} bytes): it is corrupt or truncated; download it again.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZImageFileError(f"{name}: the safetensors header is corrupt ({e}); download the file again.") from None
    if not isinstance(header, dict):
        raise ZImageFileError(f"{name}: the safetensors header is corrupt; download the file again.")
    metadata = header.pop("__metadata__", None) or {}
    tensors, spans = {}, []
    data_len = size - 8 - header_len
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ZImageFileError(f"{name}: tensor entry {key!r} in the header is malformed; the file is corrupt.") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise ZImageFileError(f"{name}: tensor entry {key!r} in the header is malformed; the file is corrupt.")
        if end > data_len:
            raise ZImageFileError(f"{name}: the file is truncated: tensor {key!r} ends at byte {end} of the data, but "
                                  f"only {data_len} bytes are present. Download the file again (resume if you can).")
        # Every tensor must hold the bytes its shape declares, so a model sized from the header is never larger
        # than the file (an edited header cannot conjure layers).
        itemsize = SAFETENSORS_DTYPES.get(dtype)
        if itemsize is not None and math.prod(shape) * itemsize != end - start:
            raise ZImageFileError(f"{name}: tensor {key!r} declares shape {list(shape)} ({dtype}) but holds "
                                  f"{end - start} bytes; the file is corrupt or edited. Download it again.")
        tensors[key] = TensorInfo(dtype, shape, end - start)
        if end > start:
            spans.append((start, end, key))
    spans.sort()
    for (_, prev_end, prev_key), (start, _, key) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise ZImageFileError(f"{name}: tensors {prev_key!r} and {key!r} share bytes; the file is corrupt or "
                                  "edited. Download it again.")
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


# ---------------------------------------------------------------------------------------------------
# Which part a set of keys is, and under which prefix.

def find_prefix(keys, marker: str, prefixes) -> str | None:
    for prefix in prefixes:
        if prefix + marker in keys:
            return prefix
    return None


def strip_prefix(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


DIT_MARKER = "cap_embedder.1.weight"
# Z-Image Omni/Edit files carry SigLIP image features' embedder; core's NextDiT runs them where it can.
OMNI_MARKER = "siglip_embedder.1.weight"
# Edit files in the nano-edit layout (references after the image, no per-reference captions) say so here.
REFERENCE_LAYOUT_KEY = "zimage.reference_layout"
APPENDED_REFERENCES = "appended"
DIFFUSERS_DIT_MARKER = "all_x_embedder.2-1.weight"
TEXT_ENCODER_MARKER = "model.layers.0.self_attn.q_norm.weight"
VAE_MARKER = "decoder.conv_in.weight"
DIFFUSERS_VAE_MARKER = "decoder.up_blocks.0.resnets.0.norm1.weight"


# Quantised layouts ComfyUI writes: old "scaled fp8" (a `scaled_fp8` marker tensor, fp8 weights and per-layer
# `scale_weight` / `scale_input`) and newer mixed precision (per-layer `comfy_quant` tensors holding a JSON config,
# beside `weight_scale`, `input_scale`, ...; or the same per-layer configs in the header's `_quantization_metadata`).
SCALED_FP8_MARKER = "scaled_fp8"
COMFY_QUANT_SUFFIX = ".comfy_quant"
QUANTIZATION_METADATA = "_quantization_metadata"


def is_quantized(keys, metadata: dict) -> bool:
    """Whether a part (keys without its prefix) is in one of ComfyUI's quantised layouts, whose scales must be read."""
    return (QUANTIZATION_METADATA in metadata
            or any(k == SCALED_FP8_MARKER or k.endswith(COMFY_QUANT_SUFFIX) for k in keys))


def describe_foreign_layout(keys) -> str:
    """Name the model family a key set most likely belongs to, for error messages."""
    joined = "\n".join(list(keys)[:4000])
    checks = [
        ("an SD1.x/SD2.x/SDXL UNet", r"(^|\.)input_blocks\.\d+\."),
        ("a Flux/Chroma transformer", r"(^|\.)double_blocks\.\d+\."),
        ("an SD3/MMDiT transformer", r"(^|\.)joint_blocks\.\d+\."),
        ("a diffusers UNet", r"(^|\.)down_blocks\.\d+\.attentions"),
        ("a Wan video model", r"(^|\.)blocks\.\d+\.self_attn\.q\."),
        ("a Lumina-2 model (not Z-Image: no Z-Image modulation)", r"layers\.0\.adaLN_modulation\.1\.weight"),
        ("a CLIP text encoder", r"text_model\.encoder\.layers|transformer\.resblocks"),
        ("a T5 text encoder", r"encoder\.block\.\d+\.layer"),
        ("a LoRA (load it with a LoRA loader instead)", r"lora_(up|down|A|B)|\.lora\."),
    ]
    for label, pattern in checks:
        if re.search(pattern, joined, re.M):
            return label
    return "an unknown model"


# ---------------------------------------------------------------------------------------------------
# A part: the tensors of one model component, possibly spread over shards, under a prefix.

@dataclass
class Part:
    label: str
    headers: list[SafetensorsHeader]
    prefix: str = ""
    layout: str = "comfy"  # or "diffusers"
    metadata: dict = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple]:
        return {k[len(self.prefix):]: t.shape for h in self.headers for k, t in h.tensors.items()
                if k.startswith(self.prefix)}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for h in self.headers for k, t in h.tensors.items() if k.startswith(self.prefix))

    @property
    def dtypes(self) -> dict[str, str]:
        return {k[len(self.prefix):]: t.dtype for h in self.headers for k, t in h.tensors.items()
                if k.startswith(self.prefix)}


@dataclass
class Parts:
    dit: Part
    text_encoder: Part
    vae: Part
    model_name: str


def part_in(headers: list[SafetensorsHeader], label: str, markers: dict[str, str], prefixes) -> Part | None:
    keys = {k for h in headers for k in h.tensors}
    for layout, marker in markers.items():
        prefix = find_prefix(keys, marker, prefixes)
        if prefix is not None:
            meta = {k: v for h in headers for k, v in h.metadata.items()}
            return Part(label, headers, prefix, layout, meta)
    return None


def dit_part(headers, label) -> Part | None:
    # diffusers keeps the name cap_embedder.1.weight too, so its own marker is tried first.
    return part_in(headers, label, {"diffusers": DIFFUSERS_DIT_MARKER, "comfy": DIT_MARKER}, DIT_PREFIXES)


def text_encoder_part(headers, label) -> Part | None:
    return part_in(headers, label, {"comfy": TEXT_ENCODER_MARKER}, TEXT_ENCODER_PREFIXES)


def vae_part(headers, label) -> Part | None:
    return part_in(headers, label, {"diffusers": DIFFUSERS_VAE_MARKER, "comfy": VAE_MARKER}, VAE_PREFIXES)


# ---------------------------------------------------------------------------------------------------
# Diffusion model (NextDiT with Z-Image modulation).

def count_blocks(shapes: dict, prefix: str, name: str = "the file", same=("norm",)) -> int:
    """How many blocks `prefix`0., `prefix`1., ... the file holds. The count sizes the model, so it is taken only
    from blocks that are really there: numbered 0..n-1 without a gap, none of their tensors empty (read_header has
    checked that each tensor holds its bytes), and each with block 0's tensors whose names contain one of `same`
    (norm weights, never quantised) at block 0's shapes. One stray key such as `layers.99999999.x`, or a run of
    empty ones, would otherwise build a model of 10^8 layers from a small file."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    blocks: dict[int, dict] = {}
    for key, shape in shapes.items():
        if m := pattern.match(key):
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(shape)
    if not blocks:
        return 0
    n = len(blocks)
    if max(blocks) != n - 1:
        missing = next(i for i in range(n + 1) if i not in blocks)  # n blocks, so one of 0..n is absent
        raise ZImageFileError(f"{name}: its blocks {prefix}N are numbered up to {max(blocks)} but block {missing} is "
                              "missing; the file is damaged or edited. Download it again.")
    kept = {k: v for k, v in blocks[0].items() if any(word in k for word in same)}
    for i, block in blocks.items():
        if any(math.prod(shape) == 0 for shape in block.values()) or any(block.get(k) != v for k, v in kept.items()):
            raise ZImageFileError(f"{name}: block {prefix}{i} is empty or does not match {prefix}0; the file is "
                                  "damaged or edited. Download it again.")
    return n


def default_axes_dims(head_dim: int) -> list[int]:
    """RoPE split of a head: Z-Image uses [32, 48, 48] for head_dim 128; scale that ratio for other heads."""
    first = 2 * round(head_dim / 8)
    rest = head_dim - first
    second = (rest // 2) // 2 * 2
    return [first, second, rest - second]


def infer_dit_config(shapes: dict[str, tuple], name: str, metadata: dict | None = None) -> dict:
    """The NextDiT constructor arguments (ComfyUI `unet_config`) implied by a comfy-format key set."""
    metadata = metadata or {}
    required = ["x_embedder.weight", "cap_embedder.1.weight", "final_layer.linear.weight",
                "layers.0.attention.qkv.weight", "layers.0.attention.q_norm.weight",
                "layers.0.feed_forward.w1.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"]
    if "layers.0.adaLN_modulation.1.weight" in shapes:
        raise ZImageFileError(f"{name}: this is a Lumina-2 model, not Z-Image (its blocks lack Z-Image's modulation). "
                              "Load it with ComfyUI's UNETLoader instead.")
    missing = [k for k in required + ["layers.0.adaLN_modulation.0.weight"] if k not in shapes]
    if missing:
        raise ZImageFileError(f"{name}: not a complete Z-Image diffusion model: missing {', '.join(missing[:3])}"
                              f"{' …' if len(missing) > 3 else ''}. The file is incomplete or a different model.")
    dim, patch_features = shapes["x_embedder.weight"]
    head_dim = shapes["layers.0.attention.q_norm.weight"][0]
    qkv_rows = shapes["layers.0.attention.qkv.weight"][0]
    n_heads = dim // head_dim
    n_kv_heads = (qkv_rows // head_dim - n_heads) // 2
    latent_channels = 16
    patch_size = math.isqrt(patch_features // latent_channels)
    if (dim % head_dim or n_kv_heads <= 0 or patch_size * patch_size * latent_channels != patch_features
            or shapes["final_layer.linear.weight"][0] != patch_features):
        raise ZImageFileError(f"{name}: tensor shapes are inconsistent with a Z-Image model (dim {dim}, head_dim "
                              f"{head_dim}, patch features {patch_features}); the file is damaged or not Z-Image.")
    if dim < 256:
        raise ZImageFileError(f"{name}: dim {dim} is below 256, which ComfyUI's Z-Image modulation cannot run.")
    hidden = shapes["layers.0.feed_forward.w1.weight"][0]
    # Reproduce the real models' FFN rule exactly where it applies, else any hidden width.
    ffn_multiplier, multiple_of = 8.0 / 3.0, 256
    if multiple_of * -(-int(dim * ffn_multiplier) // multiple_of) != hidden:
        ffn_multiplier, multiple_of = hidden / dim, hidden
    n_layers = count_blocks(shapes, "layers.", name)
    n_refiner = count_blocks(shapes, "noise_refiner.", name)
    if count_blocks(shapes, "context_refiner.", name) != n_refiner:
        raise ZImageFileError(f"{name}: noise_refiner and context_refiner have different depths; the file is damaged.")
    if shapes["t_embedder.mlp.0.weight"][0] != min(dim, 1024) or shapes["t_embedder.mlp.2.weight"][0] != min(dim, 256):
        raise ZImageFileError(f"{name}: its timestep embedder does not have Z-Image's shape for dim {dim}.")
    try:
        extra = json.loads(metadata.get("zimage.dit_config", "{}"))
        if not isinstance(extra, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ZImageFileError(f"{name}: its metadata zimage.dit_config is not a valid JSON object ({e}); the file is "
                              "damaged or edited. Download it again.") from None
    return {
        "image_model": "lumina2",
        "patch_size": patch_size,
        "in_channels": latent_channels,
        "dim": dim,
        "cap_feat_dim": shapes["cap_embedder.1.weight"][1],
        "n_layers": n_layers,
        "n_refiner_layers": n_refiner,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_multiplier,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "axes_dims": extra.get("axes_dims", default_axes_dims(head_dim)),
        "axes_lens": extra.get("axes_lens", [1536, 512, 512]),
        "rope_theta": float(extra.get("rope_theta", 256.0)),
        "z_image_modulation": True,
        "time_scale": float(extra.get("time_scale", 1000.0)),
        "pad_tokens_multiple": 32 if "cap_pad_token" in shapes else None,
        **({"siglip_feat_dim": shapes[OMNI_MARKER][1]} if OMNI_MARKER in shapes else {}),
    }


def reference_layout(variant: str, shapes, metadata: dict) -> str | None:
    """How an edit model takes its input image: "omni" (core's Z-Image Omni layout, SigLIP features and
    references before the image), "appended" (the nano-edit layout), or None for a text-to-image model."""
    if OMNI_MARKER in shapes:
        return "omni"
    if metadata.get(REFERENCE_LAYOUT_KEY) == APPENDED_REFERENCES or variant == "edit":
        return APPENDED_REFERENCES
    return None


# ---------------------------------------------------------------------------------------------------
# Text encoder (Qwen3, ComfyUI's Llama code).

def infer_qwen3_config(shapes: dict[str, tuple], name: str) -> dict:
    """Qwen3 config fields implied by a HF/ComfyUI-format key set (keys start with `model.`)."""
    needed = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.k_proj.weight", TEXT_ENCODER_MARKER, "model.layers.0.mlp.gate_proj.weight",
              "model.norm.weight"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise ZImageFileError(f"{name}: not a Qwen3 text encoder (missing {missing[0]}); it looks like "
                              f"{describe_foreign_layout(shapes)}. Z-Image needs the Qwen3-4B encoder "
                              "(qwen_3_4b.safetensors).")
    vocab, hidden = shapes["model.embed_tokens.weight"]
    head_dim = shapes[TEXT_ENCODER_MARKER][0]
    layers = count_blocks(shapes, "model.layers.", name)
    if layers < 3:
        raise ZImageFileError(f"{name}: a text encoder with {layers} layers; Z-Image reads the second-to-last "
                              "layer's hidden states, so it needs at least 3.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": shapes["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
        "num_key_value_heads": shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
        "head_dim": head_dim,
    }


# ---------------------------------------------------------------------------------------------------
# VAE (AutoencoderKL, ldm key layout; diffusers layout is converted by ComfyUI's own table).

def infer_vae_config(shapes: dict[str, tuple], name: str) -> dict:
    """The AutoencoderKL ddconfig implied by an ldm-format VAE key set."""
    needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", VAE_MARKER, "decoder.conv_out.weight"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise ZImageFileError(f"{name}: not an AutoencoderKL VAE (missing {missing[0]}); it looks like "
                              f"{describe_foreign_layout(shapes)}. Z-Image uses the Flux VAE (ae.safetensors).")
    ch = shapes["encoder.conv_in.weight"][0]
    levels = count_blocks({k: v for k, v in shapes.items() if k.startswith("encoder.down.") and k.endswith(
        ".block.0.conv2.weight")}, "encoder.down.", name, same=())
    ch_mult = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels)]
    z_channels = shapes[VAE_MARKER][1]
    if z_channels != 16:
        raise ZImageFileError(f"{name}: this VAE has {z_channels} latent channels; Z-Image needs a 16-channel "
                              "(Flux-family) VAE such as ae.safetensors.")
    return {
        "double_z": shapes["encoder.conv_out.weight"][0] == 2 * z_channels,
        "z_channels": z_channels,
        "resolution": 256,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_ch": shapes["decoder.conv_out.weight"][0],
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": count_blocks({k: v for k, v in shapes.items() if k.startswith("encoder.down.0.block.")
                                        and k.endswith(".conv2.weight")}, "encoder.down.0.block.", name, same=()),
        "attn_resolutions": [],
        "dropout": 0.0,
    }


# ---------------------------------------------------------------------------------------------------
# Variant (turbo / base / edit) from metadata, file name and keys.

def detect_variant(name: str, metadata: dict, keys=()) -> tuple[str, str]:
    """(variant, how it was told). Metadata wins, then the file name, then the key layout."""
    for field_name in ("zimage.variant", "modelspec.title", "modelspec.architecture", "name"):
        value = metadata.get(field_name, "").lower()
        for variant in ("turbo", "edit", "omni", "base"):
            if variant in value:
                return ("edit" if variant == "omni" else variant), f"metadata {field_name}={metadata[field_name]!r}"
    lowered = Path(name).name.lower()
    for variant, words in (("turbo", ("turbo",)), ("edit", ("edit", "omni")), ("base", ("base",))):
        if any(w in lowered for w in words):
            return variant, f"file name {Path(name).name!r}"
    if any(k.startswith(("ref_", "reference_")) for k in keys):
        return "edit", "reference-image keys"
    return "turbo", "default (Z-Image-Turbo is the released model; name the file or set metadata to choose)"


# ---------------------------------------------------------------------------------------------------
# The load plan: everything the loader decides from the headers, before it reads a weight.

# The loader's weight_dtype and compute_dtype choices, as safetensors dtype names (None: ComfyUI chooses for the
# device); the loader turns a name into a torch dtype with its one table.
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": "F8_E4M3", "fp8_e4m3fn_fast": "F8_E4M3", "fp8_e5m2": "F8_E5M2",
                 "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
COMPUTE_DTYPES = {name: WEIGHT_DTYPES[name] for name in ("default", "bf16", "fp16", "fp32")}


@dataclass(frozen=True)
class LoadPlan:
    dit_config: dict
    text_encoder_config: dict
    vae_config: dict
    variant: str
    variant_reason: str
    reference_layout: str | None  # see reference_layout
    weight_dtype: str | None  # safetensors dtype names; None: ComfyUI chooses for the device
    compute_dtype: str | None
    fp8_fast: bool  # fp8 weights also compute in fp8 where the GPU can

    @property
    def reference_images(self) -> bool:
        """Whether the diffusion model takes reference latents in the nano-edit layout (core's model does not)."""
        return self.reference_layout == APPENDED_REFERENCES


def text_encoder_config(part: Part, dit_config: dict, dit_label: str) -> dict:
    """The Qwen3 config of a text encoder part, refused unless its features are as wide as the diffusion model takes
    (the one check of the width, both for a chosen encoder and for one looked for in the folder)."""
    config = infer_qwen3_config(part.shapes, part.label)
    if config["hidden_size"] != dit_config["cap_feat_dim"]:
        raise ZImageFileError(
            f"{part.label}: this text encoder outputs {config['hidden_size']}-wide features but {dit_label} expects "
            f"{dit_config['cap_feat_dim']} (cap_embedder width). Use the text encoder made for this model "
            "(qwen_3_4b.safetensors for real Z-Image; the nano text encoder for nano models).")
    return config


def dtype_choice(name: str, value: str, choices: dict[str, str | None]) -> str | None:
    if value not in choices:  # older ComfyUI passes any value a client sends
        raise ZImageFileError(f"{name} {value!r} is not one of {', '.join(choices)}.")
    return choices[value]


def most_common_dtype(dtypes: dict[str, str]) -> str:
    """The safetensors dtype most tensors of a part are stored in (F32 for none)."""
    counts = Counter(dtypes.values())
    return max(counts, key=counts.get) if counts else "F32"


def plan_load(parts: Parts, dit_config: dict, dit_shapes: dict[str, tuple], vae_shapes: dict[str, tuple],
              core_runs_omni: bool, weight_dtype: str | None = None, compute_dtype: str | None = None,
              fp8_fast: bool = False) -> LoadPlan:
    """The whole plan from the resolved parts. The diffusion model's shapes and the VAE's come in ComfyUI's key layout
    (the loader converts a diffusers folder's); `core_runs_omni`: the running core's NextDiT runs Z-Image Omni/Edit;
    the dtypes are safetensors names (see dtype_choice)."""
    te_config = text_encoder_config(parts.text_encoder, dit_config, parts.dit.label)
    vae_config = infer_vae_config(vae_shapes, parts.vae.label)
    variant, reason = detect_variant(parts.model_name, parts.dit.metadata, parts.dit.shapes.keys())
    layout = reference_layout(variant, dit_shapes, parts.dit.metadata)
    if layout == "omni" and not core_runs_omni:
        raise ZImageFileError(f"{parts.dit.label}: a Z-Image Omni/Edit model (it has SigLIP image-feature weights), which "
                              "this ComfyUI's NextDiT cannot run. Update ComfyUI (0.33 runs them) and load the file "
                              "again.")
    return LoadPlan(dit_config, te_config, vae_config, variant, reason, layout, weight_dtype, compute_dtype, fp8_fast)
