"""The package's model classes: Z-Image with reference images (edit) in the nano-edit layout on every supported
ComfyUI, and core's Qwen3 at any size. The loader and the nano trainer build their models from here.

The input image enters the model as reference latent tokens appended after the image tokens, with their
own RoPE offset on the first axis (image k of a prompt sits at caption_length + 1 + k). The reference tokens
take the modulation of the clean timestep (sigma 0) whatever the noise level, so the model reads them as the
finished picture they are. The references come from core's `ReferenceLatent` node.

Core's NextDiT in newer ComfyUI runs Z-Image Omni/Edit itself, in another layout (references *before* the
image, each with its own caption segment, plus SigLIP features); files in that layout go to core's model
(see the loader). Files in this layout say so in their metadata (`zimage.reference_layout`).

Without references `NextDiTWithReference` is core's NextDiT (it calls core's forward), so the training script
uses it for every nano variant; `cap_lengths` lets a training batch hold captions of different lengths, each
padded with the learned pad token as inference pads it. Core's `noise_refiner` / `double_block` patches (its
Z-Image ControlNet) run in this forward at the same points as in core's.
"""
from __future__ import annotations

import math

import comfy.conds
import comfy.ldm.common_dit
import comfy.model_base
import comfy.text_encoders.llama as llama
import torch
from comfy.ldm.lumina.model import NextDiT


def _pad_tokens(tokens: torch.Tensor, pad_token: torch.Tensor, multiple: int | None) -> torch.Tensor:
    if not multiple:
        return tokens
    extra = (-tokens.shape[1]) % multiple
    pad = pad_token.to(device=tokens.device, dtype=tokens.dtype).unsqueeze(0).expand(tokens.shape[0], extra, -1)
    return torch.cat((tokens, pad), dim=1)


def _reference_block(layer, x, freqs_cis, t, t_ref, split: int, transformer_options):
    """A modulated JointTransformerBlock whose tokens from `split` on (the references) take the modulation of `t_ref`:
    core's block modulates every token alike."""
    if t_ref is t:  # no references: core's block itself
        return layer(x, None, freqs_cis, t, transformer_options=transformer_options)

    def per_token(noisy, clean):
        return torch.cat((noisy.unsqueeze(1).expand(-1, split, -1), clean.unsqueeze(1).expand(-1, x.shape[1] - split, -1)), 1)

    scale_msa, gate_msa, scale_mlp, gate_mlp = (per_token(a, b) for a, b in zip(
        layer.adaLN_modulation(t).chunk(4, dim=1), layer.adaLN_modulation(t_ref).chunk(4, dim=1), strict=True))
    attn = layer.attention(layer.attention_norm1(x) * (1 + scale_msa), None, freqs_cis, transformer_options=transformer_options)
    x = x + gate_msa.tanh() * layer.attention_norm2(attn)
    return x + gate_mlp.tanh() * layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(x) * (1 + scale_mlp)))


class NextDiTWithReference(NextDiT):
    def patchify(self, latent: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        p = self.patch_size
        latent = comfy.ldm.common_dit.pad_to_patch_size(latent, (p, p))
        B, C, H, W = latent.shape
        tokens = latent.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        return self.x_embedder(tokens), H // p, W // p

    def grid_positions(self, batch: int, h: int, w: int, first_axis: float, padded_len: int, device) -> torch.Tensor:
        pos = torch.zeros((batch, padded_len, 3), dtype=torch.float32, device=device)
        pos[:, :h * w, 0] = first_axis
        pos[:, :h * w, 1] = torch.arange(h, dtype=torch.float32, device=device).view(-1, 1).repeat(1, w).flatten()
        pos[:, :h * w, 2] = torch.arange(w, dtype=torch.float32, device=device).view(1, -1).repeat(h, 1).flatten()
        return pos

    def embed_with_references(self, x, cap_feats, cap_mask, t, t_ref, refs, transformer_options):
        """patchify_and_embed for an image plus reference latents (none: the plain layout); returns the joint
        sequence, its RoPE, the caption length and where the references begin."""
        device = x.device
        cap_feats = _pad_tokens(cap_feats, self.cap_pad_token, self.pad_tokens_multiple)
        bsz, cap_len = cap_feats.shape[:2]
        cap_pos = torch.zeros(bsz, cap_len, 3, dtype=torch.float32, device=device)
        cap_pos[:, :, 0] = torch.arange(cap_len, dtype=torch.float32, device=device) + 1.0
        pieces, positions = [], []
        for k, latent in enumerate([x] + list(refs)):
            tokens, h, w = self.patchify(latent.to(x.dtype))
            tokens = _pad_tokens(tokens, self.x_pad_token, self.pad_tokens_multiple)
            pieces.append(tokens)
            positions.append(self.grid_positions(bsz, h, w, cap_len + 1 + k, tokens.shape[1], device))
        freqs_cis = self.rope_embedder(torch.cat([cap_pos] + positions, dim=1)).movedim(1, 2)
        for layer in self.context_refiner:
            cap_feats = layer(cap_feats, cap_mask, freqs_cis[:, :cap_len], transformer_options=transformer_options)
        image = torch.cat(pieces, dim=1)
        split = pieces[0].shape[1]
        image_input, image_freqs = image, freqs_cis[:, cap_len:]
        patches = transformer_options.get("patches", {})
        for i, layer in enumerate(self.noise_refiner):
            image = _reference_block(layer, image, image_freqs, t, t_ref, split, transformer_options)
            for patch in patches.get("noise_refiner", []):
                out = patch({"img": image, "img_input": image_input, "txt": cap_feats, "pe": image_freqs, "vec": t,
                             "x": x, "block_index": i, "transformer_options": transformer_options,
                             "block_type": "noise_refiner"})
                image = out.get("img", image)
        return torch.cat((cap_feats, image), dim=1), freqs_cis, cap_len, cap_len + split

    def unpatchify(self, x, img_size, cap_size, return_tensor=False, **kwargs):
        """Core's unpatchify slices sample by sample: at batch 512 that loop was most of a GPU training step. A
        batch here shares one size and caption length, so one reshape does the same. (Newer core passes `frames`
        for video latents; those go to core's.)"""
        if not return_tensor or len(set(img_size)) != 1 or len(set(cap_size)) != 1 or kwargs.get("frames") is not None:
            return super().unpatchify(x, img_size, cap_size, return_tensor, **kwargs)
        p, (H, W), begin = self.patch_size, img_size[0], cap_size[0]
        tokens = x[:, begin:begin + (H // p) * (W // p)]
        return (tokens.reshape(x.shape[0], H // p, W // p, p, p, self.out_channels)
                .permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3))

    def _forward(self, x, timesteps, context, num_tokens, attention_mask=None, ref_latents=None, cap_lengths=None,
                 transformer_options={}, **kwargs):  # noqa: B006 - core's signature
        if not ref_latents and cap_lengths is None:
            return super()._forward(x, timesteps, context, num_tokens, attention_mask,
                                    transformer_options=transformer_options, **kwargs)
        refs = list(ref_latents or [])
        bs, c, h, w = x.shape
        x = comfy.ldm.common_dit.pad_to_patch_size(x, (self.patch_size, self.patch_size))
        t = self.t_embedder((1.0 - timesteps) * self.time_scale, dtype=x.dtype)
        # sigma 0 for the references; without references every token takes t
        t_ref = self.t_embedder(torch.full_like(timesteps, self.time_scale), dtype=x.dtype) if refs else t
        cap_feats = self.cap_embedder(context)
        if cap_lengths is not None:
            keep = torch.arange(cap_feats.shape[1], device=x.device)[None] < cap_lengths.to(x.device)[:, None]
            cap_feats = torch.where(keep[..., None], cap_feats, self.cap_pad_token.to(cap_feats.dtype))
        img, freqs_cis, cap_len, split = self.embed_with_references(x, cap_feats, attention_mask, t, t_ref, refs,
                                                                     transformer_options)
        freqs_cis = freqs_cis.to(img.device)
        patches = transformer_options.get("patches", {})
        transformer_options["total_blocks"] = len(self.layers)
        transformer_options["block_type"] = "double"
        img_input = img
        for i, layer in enumerate(self.layers):
            transformer_options["block_index"] = i
            img = _reference_block(layer, img, freqs_cis, t, t_ref, split, transformer_options)
            for patch in patches.get("double_block", []):
                out = patch({"img": img[:, cap_len:], "img_input": img_input[:, cap_len:], "txt": img[:, :cap_len],
                             "pe": freqs_cis[:, cap_len:], "vec": t, "x": x, "block_index": i,
                             "transformer_options": transformer_options})
                if "img" in out:
                    img[:, cap_len:] = out["img"]
                if "txt" in out:
                    img[:, :cap_len] = out["txt"]
        img = self.final_layer(img, t)
        img = self.unpatchify(img, [tuple(x.shape[-2:])] * bs, [cap_len] * bs, return_tensor=True)[:, :, :h, :w]
        return -img


class ZImageEditModel(comfy.model_base.Lumina2):
    """Core's Lumina2/Z-Image model (its initialisation, conditioning and memory estimate), with the diffusion model
    taking reference latents in the nano-edit layout from core's `ReferenceLatent` conditioning."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
        super().__init__(model_config, model_type, device=device)
        # The same module and parameters as core's NextDiT, with this layout's forward.
        self.diffusion_model.__class__ = NextDiTWithReference
        # Count the reference tokens in the memory estimate (newer core sets this itself).
        self.memory_usage_factor_conds = ("ref_latents",)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        refs = kwargs.get("reference_latents", None)
        if refs is not None and "ref_latents" not in out:  # older core does not pass references on
            out["ref_latents"] = comfy.conds.CONDList([self.process_latent_in(r) for r in refs])
        out.pop("ref_contexts", None)  # this layout has no per-reference captions
        out.pop("siglip_feats", None)
        return out

    def extra_conds_shapes(self, **kwargs):
        out = super().extra_conds_shapes(**kwargs)
        refs = kwargs.get("reference_latents", None)
        if refs is not None:
            out["ref_latents"] = [1, 16, sum(math.prod(r.shape[2:]) for r in refs)]
        return out


def qwen3_model_class(config: dict):
    """Core's Qwen3 text model (`Llama2_`) at the sizes of `config` (infer_qwen3_config's fields); core's Qwen3_4B at
    its sizes."""
    class SizedQwen3(llama.BaseLlama, torch.nn.Module):
        def __init__(self, config_dict, dtype, device, operations):
            super().__init__()
            cfg = llama.Qwen3_4BConfig(**{k: v for k, v in config.items() if k != "head_dim"})
            cfg.head_dim = config["head_dim"]  # a class attribute in ComfyUI's config, fixed at 128 there
            self.num_layers = cfg.num_hidden_layers
            self.model = llama.Llama2_(cfg, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype
    return SizedQwen3
