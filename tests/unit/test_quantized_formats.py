"""Every weight format the loader reads computes what the bf16 file computes, on whichever ComfyUI runs the tests.

In-process on the CPU: each tiny fixture (tests/zimage_testing/checkpoints.py, the same random weights stored in bf16,
fp16, fp32, plain fp8, old scaled fp8 and newer ComfyUI's mixed-precision `comfy_quant` layout) goes through the
plugin's own loader functions; the diffusion model runs one forward pass and the text encoder encodes a prompt, on
fixed inputs, and the output must stay within 10 % (relative L2 error) of the bf16 file's. fp8 keeps 3 mantissa
bits, so a correct fp8 load lands at a few per cent; a load that drops the per-layer scales is far off (the RMS
norms after each Z-Image attention and feed-forward absorb part of a lost scale, so the quantised fixtures include
the modulation layers, whose scale nothing absorbs; test_the_comparison_sees_dropped_scales checks the margin).
"""
from __future__ import annotations

from pathlib import Path

import comfy.quant_ops
import pytest
import torch
from comfyui_zimage.nodes import loader
from comfyui_zimage.nodes.checkpoint_format import infer_qwen3_config, read_header
from zimage_testing.checkpoints import TINY_DIT, comfy_quant, mixed_precision_fp8, save, scaled_fp8, tiny_dit

TOLERANCE = 0.1
PROMPT = "a red circle on a blue background, 一只猫"

DIT_FILES = {
    "bf16": "tiny-zimage-turbo_bf16.safetensors",
    "fp16": "tiny-zimage-base_fp16.safetensors",
    "fp32": "tiny-zimage_fp32.safetensors",
    "fp8_e4m3fn": "tiny-zimage-turbo_fp8_e4m3fn.safetensors",
    "scaled_fp8": "tiny-zimage-turbo_fp8_scaled.safetensors",
    "mixed_fp8": "tiny-zimage-turbo_mixed_fp8.safetensors",
}
TE_FILES = {
    "bf16": "tiny-qwen3_bf16.safetensors",
    "fp16": "tiny-qwen3_fp16.safetensors",
    "fp32": "tiny-qwen3_fp32.safetensors",
    "fp8_e4m3fn": "tiny-qwen3_fp8_e4m3fn.safetensors",
    "scaled_fp8": "tiny-qwen3_fp8_scaled.safetensors",
    "mixed_fp8": "tiny-qwen3_mixed_fp8.safetensors",
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def load_dit(path: Path):
    part = loader.dit_part([read_header(path)], f"diffusion_models/{path.name}")
    return loader.load_diffusion_model(part, loader.plan_dit_config(part), None, None, False, None)


def dit_output(path: Path) -> torch.Tensor:
    """One denoising step's model output on fixed inputs (core's apply_model: the sampler's entry point)."""
    patcher = load_dit(path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, TINY_DIT["in_channels"], 16, 16, generator=gen)
    context = torch.randn(1, 7, TINY_DIT["cap_feat_dim"], generator=gen)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=context, num_tokens=7)


def te_output(path: Path) -> torch.Tensor:
    part = loader.text_encoder_part([read_header(path)], f"text_encoders/{path.name}")
    clip = loader.load_text_encoder(part, infer_qwen3_config(part.shapes, part.label), None)
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(PROMPT))


@pytest.fixture(scope="module")
def dit_reference(models_dir):
    return dit_output(models_dir / "diffusion_models" / DIT_FILES["bf16"])


@pytest.fixture(scope="module")
def te_reference(models_dir):
    return te_output(models_dir / "text_encoders" / TE_FILES["bf16"])


CASES = [("diffusion model", fmt) for fmt in DIT_FILES if fmt != "bf16"] + \
        [("text encoder", fmt) for fmt in TE_FILES if fmt != "bf16"]


@pytest.mark.parametrize("part,fmt", CASES, ids=[f"{part.split()[0]}-{fmt}" for part, fmt in CASES])
def test_every_format_computes_what_bf16_computes(models_dir, request, part, fmt):
    if part == "diffusion model":
        out, reference = dit_output(models_dir / "diffusion_models" / DIT_FILES[fmt]), request.getfixturevalue("dit_reference")
    else:
        out, reference = te_output(models_dir / "text_encoders" / TE_FILES[fmt]), request.getfixturevalue("te_reference")
    assert out.shape == reference.shape
    error = relative_error(out, reference)
    print(f"{part} {fmt}: relative error {error:.4f}")
    assert error <= TOLERANCE, f"{part} {fmt}: relative error {error:.4f} vs the bf16 file"


def test_mixed_precision_described_in_the_header_loads(models_dir, dit_reference, tmp_path):
    """The same per-layer configs in the header's `_quantization_metadata` (how ComfyUI 0.3.x saved mixed-precision
    files) instead of `comfy_quant` tensors."""
    import json

    sd = mixed_precision_fp8(tiny_dit(), keep=("final_layer",))
    layers = {k[:-len(".comfy_quant")]: json.loads(bytes(sd.pop(k).tolist())) for k in list(sd)
              if k.endswith(".comfy_quant")}
    path = save(tmp_path / "tiny-zimage-turbo_fp8_header-quant.safetensors", sd,
                {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})
    error = relative_error(dit_output(path), dit_reference)
    print(f"diffusion model mixed_fp8 (header metadata): relative error {error:.4f}")
    assert error <= TOLERANCE


def test_quantized_layers_are_loaded_by_cores_quantised_ops(models_dir):
    """The scaled and mixed files keep fp8 storage (core's scaled-fp8 or mixed-precision layers), not a copy cast up."""
    for name in (DIT_FILES["scaled_fp8"], DIT_FILES["mixed_fp8"]):
        qkv = load_dit(models_dir / "diffusion_models" / name).model.diffusion_model.layers[0].attention.qkv
        if isinstance(qkv.weight, comfy.quant_ops.QuantizedTensor):  # mixed precision: fp8 data with its scale
            assert qkv.weight._qdata.dtype == torch.float8_e4m3fn
        else:  # older core's scaled fp8: the weight itself is fp8, beside its scale
            assert qkv.weight.dtype == torch.float8_e4m3fn and float(qkv.scale_weight) != 1.0


def test_the_comparison_sees_dropped_scales(models_dir, dit_reference, tmp_path):
    """A load that ignores the scales (here: the fp8 data of the scaled file read as plain fp8 weights) fails the
    tolerance by far, so the format tests above can fail."""
    sd = scaled_fp8(tiny_dit())
    unscaled = {k: v for k, v in sd.items() if not k.endswith(".scale_weight") and k != "scaled_fp8"}
    path = save(tmp_path / "diffusion_models" / "tiny-zimage-turbo_fp8_scales-dropped.safetensors", unscaled)
    assert relative_error(dit_output(path), dit_reference) > 10 * TOLERANCE


def test_unknown_quantisation_format_is_named(models_dir, tmp_path):
    sd = mixed_precision_fp8(tiny_dit())
    sd["layers.0.attention.qkv.comfy_quant"] = comfy_quant({"format": "float3_imaginary"})
    path = save(tmp_path / "tiny-zimage-turbo_odd-quant.safetensors", sd)
    with pytest.raises(loader.ZImageFileError) as e:
        load_dit(path)
    message = str(e.value)
    assert path.name in message and "float3_imaginary" in message and "Update ComfyUI" in message
