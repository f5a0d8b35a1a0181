"""NextDiTWithReference: core's NextDiT exactly without references; reference tokens change the result."""
from __future__ import annotations

import comfy.ops
import pytest
import torch
from comfy.ldm.lumina.model import NextDiT
from comfyui_zimage.nodes.edit import NextDiTWithReference, _reference_block

CONFIG = dict(patch_size=2, in_channels=16, dim=256, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
              multiple_of=512, ffn_dim_multiplier=2.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
              axes_dims=[16, 24, 24], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
              time_scale=1000.0, pad_tokens_multiple=32)


@pytest.fixture(scope="module")
def models():
    ours = NextDiTWithReference(**CONFIG, operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.5 / p[0].numel() ** 0.5 if p.ndim > 1 else 1.0 + 0.1 * noise)
    core = NextDiT(**CONFIG, operations=comfy.ops.disable_weight_init)
    core.load_state_dict(ours.state_dict())
    return ours, core


def inputs(batch=2, cap=13, size=16):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 16, size, size, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, cap, 32, generator=gen))


@torch.no_grad()
def test_without_references_it_is_core_nextdit(models):
    ours, core = models
    x, t, ctx = inputs()
    expected = core(x, t, ctx, ctx.shape[1])
    assert torch.equal(ours(x, t, ctx, ctx.shape[1]), expected)
    # odd sizes are padded to the patch and cropped back the same way
    x2, t2, ctx2 = inputs(batch=1, size=10)
    assert torch.equal(ours(x2, t2, ctx2, 13), core(x2, t2, ctx2, 13))


@torch.no_grad()
def test_cap_lengths_pad_each_caption_as_inference_does(models):
    ours, _ = models
    x, t, ctx = inputs()
    padded = torch.cat([ctx, torch.randn(2, 6, 32)], dim=1)  # garbage after each caption's end
    alone = ours(x, t, ctx, ctx.shape[1])
    assert torch.allclose(ours(x, t, padded, padded.shape[1], cap_lengths=torch.tensor([13, 13])), alone, atol=1e-5)
    assert not torch.allclose(ours(x, t, padded, padded.shape[1]), alone, atol=1e-3)


@torch.no_grad()
def test_reference_latents_are_seen_and_keep_the_output_shape(models):
    ours, _ = models
    x, t, ctx = inputs()
    plain = ours(x, t, ctx, 13)
    ref_a = ours(x, t, ctx, 13, ref_latents=[torch.zeros_like(x)])
    ref_b = ours(x, t, ctx, 13, ref_latents=[torch.ones_like(x)])
    assert ref_a.shape == plain.shape
    assert not torch.allclose(ref_a, ref_b, atol=1e-4) and not torch.allclose(ref_a, plain, atol=1e-4)
    # a reference of another size is patchified on its own grid
    assert ours(x, t, ctx, 13, ref_latents=[torch.randn(2, 16, 12, 20)]).shape == plain.shape


@torch.no_grad()
def test_reference_tokens_are_modulated_at_the_clean_timestep(models):
    ours, _ = models
    layer = ours.layers[0]
    gen = torch.Generator().manual_seed(2)
    x, t, t_ref = torch.randn(2, 96, 256, generator=gen), torch.randn(2, 256, generator=gen), torch.randn(2, 256, generator=gen)
    freqs = ours.rope_embedder(torch.rand(2, 96, 3, generator=gen) * 20).movedim(1, 2)
    # with one timestep for all tokens it is core's block
    assert torch.allclose(_reference_block(layer, x, freqs, t, t, 64, {}), layer(x, None, freqs, t), atol=1e-5)
    # the reference tokens' own modulation changes them (and, through attention, the rest)
    mixed = _reference_block(layer, x, freqs, t, t_ref, 64, {})
    assert not torch.allclose(mixed[:, 64:], layer(x, None, freqs, t)[:, 64:], atol=1e-3)


def test_batched_unpatchify_is_cores_per_sample_loop(models):
    ours, core = models
    x = torch.randn(3, 7 + 6 * 10 + 5, 2 * 2 * 16)  # caption 7, a 12x20 image in 2x2 patches, 5 pad tokens
    expected = NextDiT.unpatchify(core, x, [(12, 20)] * 3, [7] * 3, return_tensor=True)
    assert torch.equal(ours.unpatchify(x, [(12, 20)] * 3, [7] * 3, return_tensor=True), expected)
    assert expected.shape == (3, 16, 12, 20)
