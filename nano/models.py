"""The nano models and their initialisation: ComfyUI's own classes (the ldm AutoencoderKL's encoder and decoder, its
Qwen3 code, NextDiT with Z-Image modulation), so what is trained is exactly what the loader builds at inference.
ComfyUI's ops leave weights uninitialised; `init_weights` seeds them.
"""
from __future__ import annotations

import math

from devtools.comfy_runtime import import_comfy, import_plugin

import_comfy()

import comfy.ops  # noqa: E402
import torch  # noqa: E402
from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402

import_plugin()
from comfyui_zimage.nodes.compat import make_llama_blocks_trainable  # noqa: E402
from comfyui_zimage.nodes.edit import NextDiTWithReference, qwen3_model_class  # noqa: E402

OPS = comfy.ops.disable_weight_init

VAE_CONFIG = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TE_CONFIG = dict(vocab_size=151936, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
DIT_CONFIG = dict(patch_size=2, in_channels=16, dim=256, n_layers=3, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                  multiple_of=512, ffn_dim_multiplier=2.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
                  axes_dims=[16, 24, 24], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
                  time_scale=1000.0, pad_tokens_multiple=32)


def init_weights(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


class VAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder(**VAE_CONFIG)
        self.decoder = Decoder(**VAE_CONFIG)
        z = VAE_CONFIG["z_channels"]
        self.quant_conv = OPS.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = OPS.Conv2d(z, z, 1)

    def reset(self, seed):
        init_weights(self, seed)
        z = VAE_CONFIG["z_channels"]
        with torch.no_grad():  # quant convs start as identities; `normalise_latents` makes them the latent affine
            self.quant_conv.weight.copy_(torch.eye(2 * z)[:, :, None, None])
            self.post_quant_conv.weight.copy_(torch.eye(z)[:, :, None, None])
            self.encoder.conv_out.weight.mul_(0.3)

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def make_text_encoder(seed: int, used_tokens: list[int]):
    te = qwen3_model_class(TE_CONFIG)(config_dict={}, dtype=torch.float32, device=None, operations=OPS)
    init_weights(te, seed)
    make_llama_blocks_trainable(te)
    with torch.no_grad():  # only the rows our captions use are non-zero: unused rows stay zero (small in git)
        table = te.model.embed_tokens.weight
        rows = table[used_tokens].clone()
        table.zero_()
        table[used_tokens] = rows
    return te


def encode_text(te, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states of layer -2, as ComfyUI's Z-Image encoder returns them (the model is causal, so
    right-padding a batch leaves every caption's states as they are alone)."""
    _, hidden = te.model(ids, intermediate_output=-2, final_layer_norm_intermediate=False)
    return hidden


def make_dit(seed: int):
    dit = NextDiTWithReference(**DIT_CONFIG, operations=OPS)
    init_weights(dit, seed)
    with torch.no_grad():  # adaLN-Zero: the output starts at zero, the blocks' gates near zero
        for p in list(dit.final_layer.parameters()):
            p.zero_()
        for layer in list(dit.layers) + list(dit.noise_refiner):
            layer.adaLN_modulation[-1].weight.mul_(0.1)
        gen = torch.Generator().manual_seed(seed + 1)  # not the global generator: make_dit(seed) is the same model
        dit.x_pad_token.normal_(0, 0.1, generator=gen)  # whatever ran before it (compiling draws from that one)
        dit.cap_pad_token.normal_(0, 0.1, generator=gen)
    return dit


def use_sdpa_attention() -> None:
    """Train with PyTorch's fused attention. On the CPU ComfyUI picks its sub-quadratic attention for the DiT, a Python
    loop of chunks that is slower here and breaks a compiled graph into pieces (recompiled for each sequence length),
    and slice attention for the VAE, which asks for the free memory on every call: the compiled encoder guarded on
    that number and recompiled 32 times while encoding the data set. The arithmetic is the same attention, so what is
    trained runs the same under either. Call before building the VAE: its attention blocks pick theirs when built."""
    import comfy.ldm.lumina.model
    import comfy.ldm.modules.diffusionmodules.model as vae_model
    from comfy.ldm.modules.attention import attention_pytorch

    comfy.ldm.lumina.model.optimized_attention_masked = attention_pytorch
    vae_model.vae_attention = lambda: vae_model.pytorch_attention

