"""Every model the loader returns stops at the first NaN or infinity it computes, saying where and why."""
from __future__ import annotations

import pytest
import torch
from comfyui_zimage.nodes import loader, model_guard
from comfyui_zimage.nodes.checkpoint_format import read_header
from zimage_testing.checkpoints import TINY_DIT, save, tiny_dit


def load(path):
    part = loader.dit_part([read_header(path)], path.name)
    return loader.load_diffusion_model(part, loader.plan_dit_config(part), torch.float32, None, False, None)


def call(patcher, x):
    ctx = torch.randn(1, 7, TINY_DIT["cap_feat_dim"], generator=torch.Generator().manual_seed(0))
    options = {"wrappers": patcher.wrappers}  # as the sampler passes them
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=ctx, num_tokens=7,
                                         transformer_options=options)


def test_nan_weights_stop_the_model_with_the_step_and_the_usual_causes(tmp_path):
    sd = tiny_dit()
    sd["layers.0.feed_forward.w2.weight"][0, 0] = float("nan")
    patcher = load(save(tmp_path / "nan-weights.safetensors", sd))
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(model_guard.NonFiniteOutput, match=r"sigma 0\.600 \(in the model itself\).*compute_dtype.*NaN"):
        call(patcher, x)
    healthy = load(save(tmp_path / "healthy.safetensors", tiny_dit()))
    assert torch.isfinite(call(healthy, x)).all()
    with pytest.raises(model_guard.NonFiniteOutput, match="its input was already non-finite"):
        call(healthy, torch.full_like(x, float("inf")))


@pytest.mark.parametrize("shape", [(1, 64, 16, 16), (2, 32, 64, 80)])
def test_chunked_vae_attention_equals_cores_and_stops_on_interrupt(shape, monkeypatch):
    import comfy.model_management as mm
    from comfy.ldm.modules.diffusionmodules import model as vae_model

    monkeypatch.setattr(model_guard, "VAE_ATTENTION_CHUNK_ELEMENTS", 1 << 20)  # (2, 32, 64, 80): 5 chunks
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    for attention in (vae_model.normal_attention, vae_model.pytorch_attention):
        torch.testing.assert_close(model_guard.interruptible_attention(attention)(q, k, v), attention(q, k, v))
    mm.interrupt_current_processing(True)
    try:
        if shape[-1] * shape[-2] * shape[0] > 1024:
            with pytest.raises(mm.InterruptProcessingException):
                model_guard.interruptible_attention(vae_model.normal_attention)(q, k, v)
    finally:
        mm.interrupt_current_processing(False)


def test_the_cpu_memory_estimate_refuses_only_what_cannot_fit():
    # nano (dim 256, fp32) measured 2.3 GB at 2048²: the estimate stays above it and below twice it.
    need = model_guard.estimate_dit_bytes((1, 16, 256, 256), 2, 256, 4)
    assert 2.3e9 < need < 4.6e9
    assert model_guard.estimate_dit_bytes((2, 16, 256, 256), 2, 256, 4) == 2 * need
