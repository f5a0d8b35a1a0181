"""Tiled VAE decode/encode, in-process on the CPU: equal to the full decode, for every AutoencoderKL layout."""
from __future__ import annotations

import json
import random

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import numpy as np
import pytest
import torch
from comfyui_zimage.nodes import model_guard, tiled_vae
from comfyui_zimage.nodes.tiled_vae import TiledVAEError, tiled_decode, tiled_encode
from zimage_testing.checkpoints import TINY_VAE, tiny_vae
from zimage_testing.helpers import REPO_ROOT

from nano import scenes

# The layouts the node promises: Z-Image/Flux (16 ch, ch_mult 1-2-4-4), the nano VAE's, and SD's 4-channel one
# (channel widths cut down so a CPU test is quick; the structure is the real one).
LAYOUTS = {
    "flux": dict(TINY_VAE, ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2),
    "nano": dict(TINY_VAE, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1),
    "sd": dict(TINY_VAE, z_channels=4, ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2),
}


def make_vae(layout: str, seed: int = 3):
    cfg = LAYOUTS[layout]
    z = cfg["z_channels"]
    sd = tiny_vae(seed, **cfg)
    gen = torch.Generator().manual_seed(seed)
    sd["quant_conv.weight"] = torch.eye(2 * z)[:, :, None, None] + 0.05 * torch.randn(2 * z, 2 * z, 1, 1, generator=gen)
    sd["quant_conv.bias"] = 0.05 * torch.randn(2 * z, generator=gen)
    sd["post_quant_conv.weight"] = torch.eye(z)[:, :, None, None] + 0.05 * torch.randn(z, z, 1, 1, generator=gen)
    sd["post_quant_conv.bias"] = 0.05 * torch.randn(z, generator=gen)
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": cfg, "embed_dim": z}})
    vae.latent_channels = z
    return vae


def latent(vae, b, h, w, seed=0):
    return torch.randn(b, vae.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exact_decode_equals_the_full_decode(layout):
    vae = make_vae(layout)
    z = latent(vae, 2, 13, 19)  # odd sizes: edge tiles are partial
    full = vae.decode(z)
    tiled = tiled_decode(vae, z, tile_size="64")
    assert tiled.shape == full.shape == (2, 104, 152, 3)
    err = (tiled - full).abs()
    assert err.max().item() * 255 <= 2.0 / 50, err.max().item() * 255  # far inside the 2/255 bar: rounding only
    assert err.mean().item() * 255 <= 0.25 / 50


def test_one_tile_larger_than_the_image_is_one_pass_and_exact():
    vae = make_vae("nano")
    z = latent(vae, 1, 8, 8)
    ticks = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append((value, total)))
    try:
        out = tiled_decode(vae, z, tile_size="1024")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (out - vae.decode(z)).abs().max().item() < 1e-4
    assert ticks == []  # one call: no progress bar (a 1/1 bar would say nothing)


def test_exact_encode_equals_the_full_encode():
    vae = make_vae("flux")
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 100, 131, 3, generator=gen)  # not multiples of 8: cropped as core crops
    full = vae.encode(pixels)
    tiled = tiled_encode(vae, pixels, tile_size="64")
    assert tiled.shape == full.shape == (2, 16, 12, 16)
    assert (tiled - full).abs().max().item() < 1e-4


def test_per_tile_statistics_would_show_seams():
    """The check above could fail: decoding tiles separately (core's way, one tiling) is visibly off."""
    vae = make_vae("flux")
    z = latent(vae, 1, 16, 16)
    full = vae.decode(z)
    halves = torch.cat([vae.decode(z[:, :, :, :8]), vae.decode(z[:, :, :, 8:])], dim=2)
    assert (halves - full).abs().max().item() * 255 > 2.0


def nano_vae():
    """The shipped, trained nano VAE (the one the bars are stated for)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = REPO_ROOT / "models" / "vae" / "nano_ae.safetensors"
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["zimage.config"])
    vae = comfy.sd.VAE(sd=load_file(str(path)), config={"params": {"ddconfig": cfg, "embed_dim": cfg["z_channels"]}})
    vae.latent_channels = cfg["z_channels"]
    return vae


def shapes_picture(side: int, seed: int = 0) -> torch.Tensor:
    """A picture like the nano family's: shapes on a background, as a ComfyUI IMAGE."""
    rng = random.Random(seed)
    img = scenes.render(scenes.random_edit_pair(rng).before, size=side)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def test_trained_nano_vae_meets_the_error_bar():
    vae = nano_vae()
    z = vae.encode(shapes_picture(384))
    full = vae.decode(z)
    err = (tiled_decode(vae, z, tile_size="128") - full).abs() * 255
    assert err.max().item() <= 2.0 and err.mean().item() <= 0.25


def test_keeping_activations_in_ram_gives_the_same_image():
    vae = make_vae("nano")
    z = latent(vae, 1, 12, 12)
    assert torch.equal(tiled_decode(vae, z, tile_size="64", keep="ram"), tiled_decode(vae, z, tile_size="64", keep="gpu"))


def test_progress_bar_ticks_once_per_tile_up_to_its_total(monkeypatch):
    bars = []

    class RecordingBar(comfy.utils.ProgressBar):  # every tick, before newer core's throttling of the UI hook
        def __init__(self, total, *args, **kwargs):
            super().__init__(total, *args, **kwargs)
            self.values = []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append(value)
            super().update_absolute(value, total, preview)

    monkeypatch.setattr(comfy.utils, "ProgressBar", RecordingBar)
    vae = make_vae("nano")
    tiled_decode(vae, latent(vae, 1, 16, 16), tile_size="64")
    assert len(bars) == 1
    assert bars[0].total > 10 and bars[0].values == list(range(1, bars[0].total + 1))


def test_interrupt_stops_between_tiles():
    vae = make_vae("nano")
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            tiled_decode(vae, latent(vae, 1, 16, 16), tile_size="64")
    finally:
        mm.interrupt_current_processing(False)


def test_out_of_memory_halves_the_tile_and_still_gives_the_exact_image(monkeypatch):
    vae = make_vae("nano")
    z = latent(vae, 1, 32, 32)
    sizes = []
    original = tiled_vae.Conv.apply

    def apply(self, x, want, have):
        sizes.append(x.shape[-1])
        if x.shape[-1] > 100 and x.shape[-2] > 100:  # pretend a 192 px tile (plus halo) does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x, want, have)

    monkeypatch.setattr(tiled_vae.Conv, "apply", apply)
    out = tiled_decode(vae, z, tile_size="192")
    assert (out - vae.decode(z)).abs().max().item() < 1e-4
    assert max(sizes) > 100  # the first try did hit the limit


@pytest.mark.parametrize("make, words", [
    (lambda vae: torch.randn(1, 4, 8, 8), "4 channels"),
    (lambda vae: torch.randn(1, 16, 2, 8, 8), "5-D"),
    (lambda vae: torch.randn(0, 16, 8, 8), "empty"),
])
def test_bad_latents_are_refused_with_a_clear_message(make, words):
    vae = make_vae("nano")
    with pytest.raises(TiledVAEError, match=words):
        tiled_decode(vae, make(vae))


@pytest.mark.parametrize("options, words", [(dict(tile_size="32"), "below the minimum"),
                                            (dict(tile_size="big"), "not a number"),
                                            (dict(keep="disk"), "keep_activations")])
def test_bad_options_are_refused(options, words):
    vae = make_vae("nano")
    with pytest.raises(TiledVAEError, match=words):
        tiled_decode(vae, latent(vae, 1, 8, 8), **options)


def test_auto_tile_fits_the_free_memory():
    vae = make_vae("nano")
    tile = tiled_vae.auto_tile(vae, (1, 16, 256, 256), torch.device("cpu"), 0)
    assert tiled_vae.MIN_TILE <= tile <= 1024
    lat = tile // 8
    assert vae.memory_used_decode((1, 16, lat, lat), vae.vae_dtype) <= 0.5 * mm.get_free_memory(torch.device("cpu"))


def test_host_memory_counts_the_containers_limit(tmp_path):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{3 << 30}\n")
    usage.write_text(f"{1 << 30}\n")
    assert model_guard.host_free_memory(((str(limit), str(usage)),)) == min(2 << 30, model_guard.host_free_memory(()))
    limit.write_text("max\n")  # no limit: the machine's available RAM
    assert model_guard.host_free_memory(((str(limit), str(usage)),)) == model_guard.host_free_memory(())


def test_activations_that_cannot_fit_in_ram_are_refused_before_any_work(monkeypatch):
    vae = make_vae("nano")
    monkeypatch.setattr(tiled_vae, "host_free_memory", lambda *a: 1 << 20)  # 1 MiB left to this process
    calls = []
    monkeypatch.setattr(tiled_vae.Conv, "apply", lambda *a, **k: calls.append(1))
    with pytest.raises(tiled_vae.TiledVAEError, match=r"GiB of activations kept in RAM, more than the 0\.0 GiB"):
        tiled_decode(vae, latent(vae, 1, 64, 64), tile_size="64")
    assert calls == []


def test_non_finite_latents_and_decodes_are_refused_naming_the_culprit():
    vae = make_vae("nano")
    z = latent(vae, 1, 8, 8)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(tiled_vae.TiledVAEError, match="the sampler .* made them, not the VAE"):
        tiled_decode(vae, z, tile_size="64")
    weight = tiled_vae.autoencoder_of(vae).decoder.conv_out.weight
    with torch.no_grad():
        saved = weight[0, 0, 0, 0].item()
        weight[0, 0, 0, 0] = float("inf")
        try:
            with pytest.raises(tiled_vae.TiledVAEError, match="VAE decoded NaN or infinite values"):
                tiled_decode(vae, latent(vae, 1, 8, 8), tile_size="64")
        finally:
            weight[0, 0, 0, 0] = saved


def test_interrupt_stops_the_whole_image_attention_between_chunks(monkeypatch):
    vae = make_vae("nano")
    monkeypatch.setattr(tiled_vae, "ATTENTION_CHUNK_ELEMENTS", 16 * 16)  # one query row of a 16x16 latent a chunk
    calls = []
    sdpa = tiled_vae.F.scaled_dot_product_attention

    def attention_then_interrupt(*args, **kwargs):
        calls.append(1)
        mm.interrupt_current_processing(True)  # the user presses Cancel during the first chunk
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(tiled_vae.F, "scaled_dot_product_attention", attention_then_interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            tiled_decode(vae, latent(vae, 1, 16, 16), tile_size="64")
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 1, "the attention went on after the interrupt"
