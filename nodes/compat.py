"""What differs between the ComfyUI versions this plugin runs on, in one place.

Every difference is told from the running ComfyUI's own code (an attribute, a signature), never from its
version string, so a release that backports or drops a feature is handled by what it has. The rest of the
plugin goes through the mechanisms every supported version shares and asks here for anything else.

Tested on ComfyUI 0.3.75 (Dec 2025) and 0.33 (Aug 2026); the README's version table lists what was checked
against newer core files.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import types
from dataclasses import dataclass, field

import comfy.model_detection
import comfy.model_management as mm
import comfy.ops
import comfy.quant_ops
import comfy.supported_models_base
import comfy.text_encoders.llama as llama
import comfy.utils
import torch
from comfy.ldm.lumina.model import NextDiT
from comfy_api.latest import io

from .checkpoint_format import COMFY_QUANT_SUFFIX, SCALED_FP8_MARKER, ZImageFileError


class ComboOutput(io.Combo.Output):
    """A combo output typed by its option list, so a link from it fits a list-typed input (KSampler's
    `sampler_name`). Older ComfyUI typed every combo output this way; newer types it "COMBO", which such
    inputs refuse ("Return type mismatch"), while both accept a list type for "COMBO" inputs."""

    @property
    def io_type(self):
        return list(self.options)


@functools.cache
def nextdit_takes_reference_latents() -> bool:
    """Core's NextDiT runs Z-Image Omni/Edit itself (reference latents, per-reference captions, SigLIP)."""
    return "siglip_feat_dim" in inspect.signature(NextDiT.__init__).parameters


@contextlib.contextmanager
def training_mode():
    """Training steps run in here: newer core fuses NextDiT's q/k RMSNorm and RoPE into a kernel with no backward
    pass unless `comfy.model_management.in_training` is set; older core has no such flag and needs none."""
    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before


def make_llama_blocks_trainable(model: torch.nn.Module) -> None:
    """Newer core's Qwen3/Llama block ends with `torch.add(residual, x, out=input)`, which autograd refuses; give
    each such block a forward that adds out of place (the same arithmetic). Older blocks are left as they are."""
    if "out=" not in inspect.getsource(llama.TransformerBlock.forward):
        return
    for module in model.modules():
        if type(module) is llama.TransformerBlock:
            module.forward = types.MethodType(_llama_block_forward_out_of_place, module)


def _llama_block_forward_out_of_place(self, x, attention_mask=None, freqs_cis=None, optimized_attention=None,
                                      past_key_value=None):
    residual = x
    x, present_key_value = self.self_attn(hidden_states=self.input_layernorm(x), attention_mask=attention_mask,
                                          freqs_cis=freqs_cis, optimized_attention=optimized_attention,
                                          past_key_value=past_key_value)
    x = residual + x
    return x + self.mlp(self.post_attention_layernorm(x)), present_key_value


# ---------------------------------------------------------------------------------------------------
# Quantised weights.
#
# Newer core loads every quantised file one way: `comfy.utils.convert_old_quants` turns an old scaled-fp8 state dict
# (and per-layer configs in the header's `_quantization_metadata`) into per-layer `comfy_quant` tensors,
# `comfy.utils.detect_layer_quantization` finds them, and `comfy.ops.mixed_precision_ops` loads each layer from its
# own config (the diffusion model through `model_config.quant_config`, a text encoder through its
# `quantization_metadata` model option). Older core reads scaled fp8 through `comfy.ops.scaled_fp8_ops`
# (`model_config.scaled_fp8`, the text encoder's `scaled_fp8` option) and mixed precision from the header's
# `_quantization_metadata` only (`model_config.layer_quant_config`, a JSON `quantization_metadata` option); the
# per-layer `comfy_quant` tensors of newer files carry the same per-layer configs, which are handed to it that way.
# Older core's quantised weights also ignore a cast to another dtype (see quantized_tensors_follow_dtype_casts).


@dataclass
class Quantization:
    """How the running core loads a quantised part."""
    mixed_precision: bool  # layers load through core's mixed_precision_ops (each from its own config)
    formats: set[str]  # the per-layer formats, e.g. {"float8_e4m3fn"}
    model_config: dict = field(default_factory=dict)  # what to set on the diffusion model's model config
    optimizations: dict = field(default_factory=dict)  # ... and in its `optimizations`
    text_encoder_options: dict = field(default_factory=dict)  # the model options a text encoder takes it from


@functools.cache
def core_converts_old_quants() -> bool:
    """Newer core reads scaled-fp8 files by converting them to the mixed-precision layout (no scaled_fp8_ops)."""
    return hasattr(comfy.utils, "convert_old_quants") and hasattr(comfy.utils, "detect_layer_quantization")


@functools.cache
def quantized_tensors_follow_dtype_casts() -> bool:
    """Newer core's quantised weights dequantise to the dtype a layer casts them to. Older core's ignore the cast
    (logging "dtype conversion ... not supported") and dequantise to the layer's compute dtype, so a text encoder,
    which computes in float32 whatever its weights' dtype, fails in a quantised layer ("expected m1 and m2 to have
    the same dtype") unless that layer's compute dtype is float32."""
    layout = comfy.quant_ops.QUANT_ALGOS["float8_e4m3fn"]["comfy_tensor_layout"]
    probe = comfy.quant_ops.QuantizedTensor.from_float(torch.ones(1, 1, dtype=torch.bfloat16), layout,
                                                       scale=torch.ones(()))
    logging.disable(logging.WARNING)  # the probe's expected warning on older core
    try:
        cast = probe.to(dtype=torch.float32)
    finally:
        logging.disable(logging.NOTSET)
    if isinstance(cast, comfy.quant_ops.QuantizedTensor):
        cast = cast.dequantize()
    return cast.dtype == torch.float32


def quant_formats() -> set[str]:
    """The per-layer formats the running core can load."""
    return set(comfy.quant_ops.QUANT_ALGOS)


def _layer_config(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.to(torch.uint8).flatten().tolist()).decode("utf-8"))


def prepare_quantized(sd: dict[str, torch.Tensor], metadata: dict) -> tuple[dict[str, torch.Tensor], Quantization | None]:
    """Bring the state dict of a quantised part (keys without the part's prefix, tensors as stored) into the layout
    the running core loads, and say how core loads it (None: nothing in it is quantised)."""
    metadata = dict(metadata)  # core's helpers take the quantisation entry out of the dict they are given
    if core_converts_old_quants():
        sd, _ = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
        config = comfy.utils.detect_layer_quantization(sd, "")
        if not config:
            return sd, None
        formats = {_layer_config(v).get("format") for k, v in sd.items() if k.endswith(COMFY_QUANT_SUFFIX)}
        return sd, Quantization(True, formats, model_config={"quant_config": config},
                                text_encoder_options=_text_encoder_options({"quantization_metadata": config}, config))
    if SCALED_FP8_MARKER in sd:
        marker = sd.pop(SCALED_FP8_MARKER)
        dtype = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype  # as core's model detection
        # A 2-element marker asks for full-precision matrix multiplication; any other enables fp8 optimisations.
        return sd, Quantization(False, {str(dtype).removeprefix("torch.")}, model_config={"scaled_fp8": dtype},
                                optimizations={"fp8": marker.nelement() != 2},
                                text_encoder_options={"scaled_fp8": dtype})
    layers = comfy.model_detection.detect_layer_quantization(metadata) or {}
    for key in [k for k in sd if k.endswith(COMFY_QUANT_SUFFIX)]:
        layers[key[:-len(COMFY_QUANT_SUFFIX)]] = _layer_config(sd.pop(key))
    if not layers:
        return sd, None
    formats = {conf.get("format") for conf in layers.values()}
    return sd, Quantization(True, formats, model_config={"layer_quant_config": layers},
                            text_encoder_options=_text_encoder_options(
                                {"quantization_metadata": json.dumps({"layers": layers})}, layers))


def _text_encoder_options(options: dict, ops_config: dict) -> dict:
    """The model options a text encoder takes a mixed-precision file from: core's own (the quantisation config, from
    which its text-encoder code builds mixed_precision_ops in the encoder's dtype); where quantised weights ignore
    dtype casts, core's mixed_precision_ops given directly, with the float32 compute dtype the encoder runs in."""
    if quantized_tensors_follow_dtype_casts():
        return options
    return {"custom_operations": comfy.ops.mixed_precision_ops(ops_config, torch.float32, full_precision_mm=True)}


def apply_quantization(model_config, quant: Quantization, label: str) -> None:
    """Set a diffusion model's config so core builds it with the operations that load `quant`'s layout."""
    for name, value in quant.model_config.items():
        if not hasattr(comfy.supported_models_base.BASE, name):  # newer core would ignore it and drop the scales
            raise ZImageFileError(f"{label}: this ComfyUI has no way to load its quantised weights (its model config "
                                  f"lacks {name!r}). Update ComfyUI, or use the bf16 file.")
        setattr(model_config, name, value)
    model_config.optimizations.update(quant.optimizations)
