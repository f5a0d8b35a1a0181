"""Guards the loader puts on the models it returns, so that a run fails early and says why instead of finishing
a black image, running out of memory, or ignoring /interrupt.

- Around every diffusion-model call: a NaN schedule (shift, sigmas), a NaN conditioning (text encoder), an input
  too large for the CPU's RAM, a ControlNet of another width, and a NaN/inf output are refused with the cause.
- After every CFG step: a NaN or infinite cfg is refused (the model never sees cfg), and a cfg above 1 on Turbo
  gets a warning.
- On the VAE: a decode or encode that produced NaN/inf is refused, naming the VAE.
- In every transformer block and VAE block: a check for /interrupt, so that one slow step or decode (a large
  image on a CPU) stops within a block's time rather than the whole call's.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import comfy.model_management as mm
import psutil
import torch
import torch.nn.functional as F

from .checkpoint_format import ZImageFileError
from .shared import ZImageError

log = logging.getLogger("comfyui-zimage")

GUARD_KEY = "zimage-guard"

CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))

# Peak working memory of one NextDiT call on the CPU (core's sub-quadratic attention), per image token and per
# unit of model width, in elements of the compute dtype. Measured on nano-turbo (dim 256, fp32): 146-152 KB per
# token at 1024² and 2048²; 160 keeps a margin. See estimate_dit_bytes.
CPU_ELEMENTS_PER_TOKEN_AND_WIDTH = 160

USUAL_CAUSES = ("Usual causes: fp16 compute on a model that needs bf16 or fp32 (set the loader's compute_dtype to "
                "bf16), an attention backend or patch (SageAttention, a quantised kernel), NaN or infinite weights in "
                "the file, or a NaN/infinite cfg, shift or prompt weight.")


class NonFiniteOutput(ZImageError, RuntimeError):
    """A model computed NaN or infinity: the image would come out black."""


class TooLargeForMemory(ZImageError, RuntimeError):
    """The work would need more RAM than the process has: on the CPU the kernel would kill the whole server."""


def host_free_memory(cgroup_files=CGROUP_FILES) -> int:
    """RAM this process may still take: what the machine has available, or less where its container's memory
    limit leaves less (a container sees the host's free RAM, and is killed at its own limit)."""
    free = int(psutil.virtual_memory().available)
    for limit_file, usage_file in cgroup_files:
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            free = min(free, int(limit) - usage)
    return max(free, 0)


def estimate_dit_bytes(latent_shape, patch_size: int, width: int, element_size: int) -> int:
    """Peak working memory of one diffusion-model call on the CPU for a latent of this shape."""
    batch, height, width_px = latent_shape[0], latent_shape[-2], latent_shape[-1]
    tokens = math.ceil(height / patch_size) * math.ceil(width_px / patch_size)
    return batch * tokens * width * element_size * CPU_ELEMENTS_PER_TOKEN_AND_WIDTH


def check_fits_in_ram(diffusion_model, x: torch.Tensor) -> None:
    """On the CPU an out-of-memory is not an exception but the kernel killing the server (and every queued
    prompt), so refuse a size that cannot fit before core's NextDiT starts on it."""
    if x.device.type != "cpu":
        return  # CUDA reports an out-of-memory as an error ComfyUI shows; core plans VRAM itself
    need = estimate_dit_bytes(x.shape, diffusion_model.patch_size, diffusion_model.dim, x.element_size())
    free = host_free_memory()
    if need > free:
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        raise TooLargeForMemory(
            f"A {w}×{h} image (batch {x.shape[0]}) needs about {need / 2**30:.1f} GB of RAM per diffusion step on the "
            f"CPU, and this process has {free / 2**30:.1f} GB free; the system would kill ComfyUI. Choose a smaller "
            "size or batch (and upscale afterwards), or run on a GPU.")


def check_model_inputs(x: torch.Tensor, timesteps: torch.Tensor, context) -> None:
    if not bool(torch.isfinite(timesteps).all()):
        raise NonFiniteOutput("The sampling schedule is NaN or infinite (sigma "
                              f"{float(timesteps.flatten()[0])}), so every step would be black: the shift (ModelSampling"
                              " node or the loader's shift output), the sigmas or denoise is not a finite number. Set "
                              "it to a number (Z-Image Turbo: shift 3).")
    if isinstance(context, torch.Tensor) and not bool(torch.isfinite(context).all()):
        raise NonFiniteOutput("The prompt's conditioning holds NaN or infinite values: the text encoder produced them "
                              "or a prompt weight is not finite. Check the text encoder file and its compute dtype "
                              "(bf16 or fp32), and the weights in the prompt.")


def refuse_foreign_controlnet(width: int, transformer_options: dict) -> None:
    """A ControlNet made for another width fails deep in the first block with a shape error; say which it is."""
    patches = transformer_options.get("patches", {})
    for patch in patches.get("noise_refiner", []) + patches.get("double_block", []):
        control = getattr(getattr(patch, "model_patch", None), "model", None)
        layers = getattr(control, "control_layers", None)
        control_width = getattr(layers[0], "dim", None) if layers else None
        if control_width is not None and control_width != width:
            raise ZImageFileError(f"This Z-Image ControlNet is made for {control_width}-wide models, but the loaded "
                                  f"model is {width} wide" + (" (a nano model)" if width < 1024 else "") + ". Use it "
                                  "with the Z-Image model it was trained for (the real Z-Image Turbo/Base files), or "
                                  "bypass the ControlNet node.")


def guard_model_call(executor, x, timesteps, *args, **kwargs):
    """Core's DIFFUSION_MODEL wrapper around every call of the diffusion model. (The checks read three booleans
    from the device per model call.)"""
    model = executor.class_obj
    check_model_inputs(x, timesteps, args[0] if args else kwargs.get("context"))
    refuse_foreign_controlnet(model.dim, kwargs.get("transformer_options", {}))
    check_fits_in_ram(model, x)
    out = executor(x, timesteps, *args, **kwargs)
    if not bool(torch.isfinite(out).all()):
        where = "its input was already non-finite" if not bool(torch.isfinite(x).all()) else "in the model itself"
        sigma = float(timesteps.flatten()[0])  # a flow model's timestep is its sigma
        raise NonFiniteOutput(f"The diffusion model produced NaN or infinite values at sigma {sigma:.3f} ({where}), "
                              f"which would make a black image. {USUAL_CAUSES}")
    return out


def check_cfg(args: dict):
    """A post-CFG function. ComfyUI accepts cfg NaN (no range check holds for NaN), and the mix of cond and uncond
    then turns the whole latent NaN: refuse it. Turbo is distilled to run without CFG: a cfg above 1 (the articles'
    workflows use 7) burns the picture and doubles the work, so say so once per prompt."""
    scale = args["cond_scale"]
    if not math.isfinite(float(scale)):
        raise NonFiniteOutput(f"cfg is {scale}: it must be a finite number (Z-Image Turbo: 1, Base: about 4). Set the "
                              "sampler's cfg.")
    if scale > 1.0 and getattr(args.get("model"), "zimage_variant", None) == "turbo":
        warn_once(f"cfg {scale:g} on Z-Image Turbo: Turbo is distilled for cfg 1 (no negative prompt); a higher cfg "
                  "over-saturates the picture and takes twice the time. Wire the loader's cfg output to the sampler, or "
                  "set cfg to 1.")
    return args["denoised"]


_last_warning: tuple | None = None  # prompts run one at a time: the last (prompt, message) is all "once" needs


def warn_once(message: str) -> None:
    """A warning in the log and, as a toast, in the canvas (web/warnings.js), once per prompt."""
    global _last_warning
    try:
        from server import PromptServer

        server = PromptServer.instance
        key = (getattr(server, "last_prompt_id", None), message)
    except (ImportError, AttributeError):
        server, key = None, (None, message)
    if key == _last_warning:
        return
    _last_warning = key
    log.warning("%s", message)
    if server is not None:
        server.send_sync("zimage.warning", {"message": message, "prompt_id": key[0]}, getattr(server, "client_id", None))


def check_interrupt(module, inputs):
    mm.throw_exception_if_processing_interrupted()


def add_interrupt_checks(diffusion_model: torch.nn.Module) -> None:
    """Core checks /interrupt between steps; a step of a large image on a CPU takes minutes, so check per block."""
    for name in ("noise_refiner", "context_refiner", "siglip_refiner", "layers"):
        for block in getattr(diffusion_model, name, None) or ():
            block.register_forward_pre_hook(check_interrupt)


def refuse_nonfinite_vae_output(module, inputs, output):
    if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
        what = "decoded image" if module.__class__.__name__ == "Decoder" else "encoded latent"
        raise NonFiniteOutput(f"The VAE produced NaN or infinite values in the {what}, which would make a black "
                              "image. Usual causes: fp16 VAE compute (start ComfyUI with --bf16-vae or --fp32-vae), NaN "
                              "weights in the VAE file, or a NaN latent from an earlier node.")


# Query rows per chunk of the VAE's whole-image attention: its logits stay near 1 GiB in fp32.
VAE_ATTENTION_CHUNK_ELEMENTS = 1 << 28


def interruptible_attention(attention):
    """Core's VAE attention (split, pytorch or xformers; each takes (B, C, H, W) q, k, v), replaced above one
    chunk's size by PyTorch's exact attention over chunks of query rows, with a check for /interrupt between them:
    at 2048² the mid block attends over 65 536 positions, a minute of one uninterruptible call on a CPU. An image
    of 1024² or less is one chunk and keeps core's own function."""
    def chunked(q, k, v):
        b, c, h, w = q.shape
        n = h * w
        chunk = max(1024, VAE_ATTENTION_CHUNK_ELEMENTS // (b * n))
        if chunk >= n:
            return attention(q, k, v)
        # (B, 1, N, C), contiguous, as core's pytorch_attention passes them
        q, k, v = (t.reshape(b, 1, c, n).transpose(2, 3).contiguous() for t in (q, k, v))
        out = torch.empty_like(q)
        for i in range(0, n, chunk):
            mm.throw_exception_if_processing_interrupted()
            out[:, :, i:i + chunk] = F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v)
        return out.transpose(2, 3).reshape(b, c, h, w)
    return chunked


def guard_vae(first_stage_model: torch.nn.Module) -> None:
    """Core's VAEDecode/VAEEncode run the whole image in one call (minutes at 2048² on a CPU): check /interrupt in
    every block and inside the whole-image attention, and refuse a non-finite result at the end."""
    for part in ("decoder", "encoder"):
        module = getattr(first_stage_model, part, None)
        if module is None:
            continue
        module.register_forward_hook(refuse_nonfinite_vae_output)
        for block in module.modules():
            if type(block).__name__ in ("ResnetBlock", "AttnBlock"):
                block.register_forward_pre_hook(check_interrupt)
            if callable(getattr(block, "optimized_attention", None)):
                block.optimized_attention = interruptible_attention(block.optimized_attention)
