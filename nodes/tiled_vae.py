"""Z-Image Tiled VAE Decode / Encode: seamless, memory-aware tiled VAE for any AutoencoderKL-family VAE.

Core's VAEDecodeTiled decodes each tile with the tile's own GroupNorm statistics, so colours drift from tile
to tile, and hides the seams by averaging three tilings (three times the work). Here the network runs layer
by layer instead:

- each 3x3 convolution is computed tile by tile from an input region one pixel wider than the tile (its
  receptive field), read from the neighbouring tiles' real values, so there is no seam to blend;
- each GroupNorm uses statistics summed over every tile of the whole image before any tile is normalised;
- the mid-block self-attention is global, so it runs on the whole latent-resolution tensor (1/64 of the
  pixels), a chunk of queries at a time so that the N x N attention matrix is never held.

The result is the full decode up to float rounding. Only whole activations between GroupNorms are kept (on
the GPU when they fit, else in RAM), and the 2x-upsampled ones are never stored but recomputed per tile from
the half-size one, which is what keeps the peak memory low.

Written from scratch for this package (sharing GroupNorm statistics across tiles is an old public idea; no
code is taken from other tiled-VAE projects).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.utils
import torch
import torch.nn.functional as F
from comfy.ldm.models.autoencoder import AutoencodingEngineLegacy
from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder, ResnetBlock
from comfy_api.latest import io

from .model_guard import host_free_memory
from .shared import ZImageError

log = logging.getLogger("comfyui-zimage")

AUTO = "auto"
TILE_SIZES = (AUTO, "256", "384", "512", "768", "1024", "1536", "2048")
MIN_TILE = 64  # pixels: 8 latent pixels, the smallest tile whose one-pixel halos stay a small overhead
KEEP = ("auto", "gpu", "ram")  # where whole activations live between layers
ATTENTION_CHUNK_ELEMENTS = 1 << 26  # attention logits held at once by the whole-image VAE attention (256 MiB fp32)
# On NVIDIA GPUs SDPA's fused kernels never hold the logits, and a chunk must be large to fill the GPU: 256 queries
# a call (the CPU's chunk at 4096²) made an H200 decode 4x slower than core's tiled one. Up to 2^31 (8192 queries
# at 4096²), but never more than a third of the free memory could hold, should SDPA fall back to its math path
# (logits and softmax: 8 GiB in bf16, 16 GiB in fp32 at 2^31).
ATTENTION_CHUNK_ELEMENTS_CUDA = 1 << 31


class TiledVAEError(ZImageError):
    """Input the tiled VAE cannot use, with a message that says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------
# Nodes.

TILE_TOOLTIP = ("Tile side in pixels. 'auto' picks the largest tile (up to 1024) whose working memory, by the VAE's "
                "own estimate, fits what is free now (CUDA free memory, or available RAM on the CPU). Smaller tiles "
                "need less memory and add a little time; the result does not depend on the tile size. A tile that "
                "still runs out of memory is halved and retried.")
KEEP_TOOLTIP = ("Where whole activations wait between layers. auto: on the GPU when they fit in half its free "
                "memory, else in RAM. gpu: fastest, needs the most GPU memory. ram: the least GPU memory (only "
                "one tile's work is on the GPU), at the cost of copies over PCIe. Same result either way.")
VAE_TOOLTIP = "Any image AutoencoderKL: the Flux/Z-Image VAE, the nano VAE, SD's VAE."


def tiled_schema(node_id: str, display_name: str, description: str, data_input, output) -> io.Schema:
    """The schema both nodes share: their data, then the VAE and the tiling options."""
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category="Z-Image/latent",
        description=description,
        inputs=[
            data_input,
            io.Vae.Input("vae", tooltip=VAE_TOOLTIP),
            io.Combo.Input("tile_size", options=list(TILE_SIZES), default=AUTO, tooltip=TILE_TOOLTIP),
            io.Combo.Input("keep_activations", options=list(KEEP), default="auto", tooltip=KEEP_TOOLTIP, optional=True),
        ],
        outputs=[output],
    )


class TiledVAENode(io.ComfyNode):
    @classmethod
    def validate_inputs(cls, tile_size, keep_activations="auto"):
        """Any tile_size and keep_activations reach the node, which says what is wrong with a bad one (newer
        ComfyUI would otherwise refuse a size that is not in the list, such as 640, before the node runs)."""
        return True


class ZImageTiledVAEDecode(TiledVAENode):
    @classmethod
    def define_schema(cls):
        return tiled_schema("ZImageTiledVAEDecode", "Z-Image Tiled VAE Decode",
                            "Decodes latents in tiles, layer by layer, with whole-image GroupNorm statistics and global "
                            "attention: seamless by construction and equal to a full decode, in a fraction of its "
                            "memory, and faster than core's tiled decode (which decodes three tilings).",
                            io.Latent.Input("samples"), io.Image.Output(display_name="IMAGE"))

    @classmethod
    def execute(cls, samples, vae, tile_size, keep_activations="auto") -> io.NodeOutput:
        latent = samples["samples"]
        if getattr(latent, "is_nested", False):
            raise TiledVAEError("Nested (multi-resolution) latents are not supported; decode them with core VAE Decode.")
        images = tiled_decode(vae, latent, tile_size, keep_activations)
        return io.NodeOutput(images)


class ZImageTiledVAEEncode(TiledVAENode):
    @classmethod
    def define_schema(cls):
        return tiled_schema("ZImageTiledVAEEncode", "Z-Image Tiled VAE Encode",
                            "Encodes large images in tiles, layer by layer, with whole-image GroupNorm statistics and "
                            "global attention: equal to a full encode, in a fraction of its memory (for the edit "
                            "pipeline's input images).",
                            io.Image.Input("pixels"), io.Latent.Output(display_name="LATENT"))

    @classmethod
    def execute(cls, pixels, vae, tile_size, keep_activations="auto") -> io.NodeOutput:
        return io.NodeOutput({"samples": tiled_encode(vae, pixels, tile_size, keep_activations)})


# ---------------------------------------------------------------------------------------------------
# Decode and encode: the entry points the nodes call.

def tiled_decode(vae, samples: torch.Tensor, tile_size="auto", keep: str = "auto") -> torch.Tensor:
    """Decode a latent to a ComfyUI IMAGE (B, H, W, 3), equal to `vae.decode` up to rounding."""
    vae.throw_exception_if_invalid()
    model = autoencoder_of(vae)
    check_latent(vae, samples)
    if not bool(torch.isfinite(samples).all()):
        raise TiledVAEError("The latent holds NaN or infinite values: the sampler (or the node before this one) made "
                            "them, not the VAE. See that node; with Z-Image, fp16 compute is the usual cause (set the "
                            "loader's compute_dtype to bf16).")
    tile = parse_tile_size(tile_size)
    out = run_tiled(vae, DecodeJob(vae, model, samples), tile, keep)
    if not bool(torch.isfinite(out).all()):
        raise TiledVAEError("The VAE decoded NaN or infinite values, which would make a black image. Usual causes: the "
                            "VAE running in fp16 (start ComfyUI with --fp32-vae or --bf16-vae), or NaN/infinite weights "
                            "in the VAE file (download it again).")
    with torch.inference_mode():  # `out` was made there, and newer core's process_output works in place
        return vae.process_output(out).movedim(1, -1)


def tiled_encode(vae, pixels: torch.Tensor, tile_size="auto", keep: str = "auto") -> torch.Tensor:
    """Encode a ComfyUI IMAGE (B, H, W, C) to a latent, cropped to a multiple of 8 as core crops; equal to
    `vae.encode` up to rounding."""
    vae.throw_exception_if_invalid()
    model = autoencoder_of(vae)
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise TiledVAEError(f"The image has shape {tuple(pixels.shape)}; expected a non-empty batch (batch, height, "
                            "width, channels).")
    if pixels.shape[-1] < 3:
        raise TiledVAEError(f"The image has {pixels.shape[-1]} channels; the VAE needs RGB.")
    pixels = vae.vae_encode_crop_pixels(pixels[..., :3])
    if pixels.shape[1] < 8 or pixels.shape[2] < 8:
        raise TiledVAEError(f"The image is {pixels.shape[2]}x{pixels.shape[1]} pixels; the VAE needs at least 8x8.")
    tile = parse_tile_size(tile_size)
    return run_tiled(vae, EncodeJob(vae, model, pixels), tile, keep)


# ---------------------------------------------------------------------------------------------------
# Jobs: one decode or encode, what run_tiled plans and runs.

class TiledJob:
    """The shapes of one decode or encode, the memory its exact mode keeps, its work and its progress steps."""
    vae: object
    model: AutoencodingEngineLegacy
    latent_shape: tuple[int, int, int, int]
    image_side: int  # pixels of the image's longer side

    def stored_bytes(self) -> int:
        """The most the exact mode keeps at once, at this job's latent size (the encoder's levels hold the decoder's
        widths at the same resolutions, so the decoder's count serves an encode too)."""
        return stored_bytes(self.model, self.latent_shape, self.vae.vae_dtype)

    def steps(self, budget: Budget) -> int:
        raise NotImplementedError

    def run(self, budget: Budget) -> torch.Tensor:
        raise NotImplementedError

    def budget(self, device, store, tile: int) -> Budget:
        """The budget of one attempt, with a progress bar when it runs more than one step (a one-tile image is one
        call: a 1/1 bar would say nothing)."""
        budget = Budget(device, self.vae.vae_dtype, store, tile, self.image_side)
        if (n := self.steps(budget)) > 1:
            budget.pbar = comfy.utils.ProgressBar(n)
        return budget


class DecodeJob(TiledJob):
    """A latent (B, C, h, w) to the VAE's output (B, 3, H, W) on the intermediate device."""

    def __init__(self, vae, model: AutoencodingEngineLegacy, samples: torch.Tensor):
        self.vae, self.model, self.samples = vae, model, samples
        self.latent_shape = tuple(samples.shape)
        self.decoder: Decoder = model.decoder
        self.image_side = max(self.latent_shape[2:]) * 2 ** (self.decoder.num_resolutions - 1)

    def steps(self, budget: Budget) -> int:
        """A statistics pass for each level's first input, two passes per block, then conv_out."""
        if budget.whole:
            return 1
        dec = self.decoder
        total, (hh, ww) = 0, self.latent_shape[2:]
        for i_level in reversed(range(dec.num_resolutions)):
            total += count_tiles(budget, hh, ww) * (1 + 2 * len(dec.up[i_level].block))
            if i_level != 0:
                hh, ww = 2 * hh, 2 * ww
        return total + count_tiles(budget, hh, ww)

    def run(self, budget: Budget) -> torch.Tensor:
        z = self.samples.to(budget.device, budget.dtype)
        if budget.whole:
            out = self.model.decode(z).to(mm.intermediate_device()).float()
            budget.tick()
            return out
        return decode_exact(self.model, z, budget)


class EncodeJob(TiledJob):
    """Cropped pixels (B, H, W, 3) to the latent (B, C, H/8, W/8) on the intermediate device."""

    def __init__(self, vae, model: AutoencodingEngineLegacy, pixels: torch.Tensor):
        self.vae, self.model, self.pixels = vae, model, pixels
        b, h, w, _ = pixels.shape
        self.latent_shape = (b, vae.latent_channels, h // 8, w // 8)
        self.encoder: Encoder = model.encoder
        self.image_side = max(h, w)

    def steps(self, budget: Budget) -> int:
        """Per level: a statistics pass for its first input, two passes per block."""
        if budget.whole:
            return 1
        enc = self.encoder
        total, (hh, ww) = 0, self.pixels.shape[1:3]
        for i_level in range(enc.num_resolutions):
            total += count_tiles(budget, hh, ww) * (1 + 2 * len(enc.down[i_level].block))
            hh, ww = hh // 2, ww // 2
        return total

    def run(self, budget: Budget) -> torch.Tensor:
        if budget.whole:
            x = self.vae.process_input(self.pixels.to(budget.device).movedim(-1, 1)).to(budget.dtype)
            z = self.model.encode(x).to(mm.intermediate_device()).float()
            budget.tick()
            return z
        field = Pixels(self.pixels, self.vae.process_input, budget.device, budget.dtype)
        return encode_exact(self.model, field, budget).to(mm.intermediate_device()).float()


# ---------------------------------------------------------------------------------------------------
# Checks, sizes and the retry loop.

def autoencoder_of(vae) -> AutoencodingEngineLegacy:
    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, AutoencodingEngineLegacy) or not isinstance(model.decoder, Decoder) \
            or getattr(model, "bn", None) is not None or model.decoder.conv_in.weight.ndim != 4:
        kind = type(model).__name__ if model is not None else "no model"
        raise TiledVAEError(f"This VAE ({kind}) is not an image AutoencoderKL (SD, SDXL, Flux, Z-Image); the Z-Image "
                            "tiled VAE nodes only run those. Use core VAE Decode (Tiled) for video or other VAEs.")
    return model


def check_latent(vae, samples: torch.Tensor) -> None:
    if samples.ndim == 5:
        raise TiledVAEError(f"The latent is 5-D {tuple(samples.shape)} (a video latent); this node decodes images. "
                            "Use a video VAE decode node, or pick one frame first.")
    if samples.ndim != 4:
        raise TiledVAEError(f"The latent has shape {tuple(samples.shape)}; an image latent is (batch, channels, height, width).")
    if samples.shape[0] == 0:
        raise TiledVAEError("The latent batch is empty (0 images); nothing to decode. Check the node that makes it.")
    channels = getattr(vae, "latent_channels", samples.shape[1])
    if samples.shape[1] != channels:
        hint = " (an SD1/SDXL latent)" if samples.shape[1] == 4 else ""
        raise TiledVAEError(f"The latent has {samples.shape[1]} channels{hint} but this VAE takes {channels}. Decode it "
                            f"with the VAE of the model that made it.")
    if samples.shape[2] < 1 or samples.shape[3] < 1:
        raise TiledVAEError(f"The latent has no pixels {tuple(samples.shape)}.")


def parse_tile_size(tile_size: str | int) -> int | None:
    """None for auto; else pixels, a multiple of 8 no smaller than MIN_TILE."""
    if str(tile_size).strip().lower() == AUTO:
        return None
    try:
        value = int(str(tile_size).strip())
    except ValueError:
        raise TiledVAEError(f"tile_size {tile_size!r} is not a number; choose 'auto' or a size in pixels such as 512.") from None
    if value < MIN_TILE:
        raise TiledVAEError(f"tile_size {value} is below the minimum of {MIN_TILE} pixels; choose 'auto' or {MIN_TILE} or more.")
    return value - value % 8


def free_memory(device) -> int:
    return host_free_memory() if torch.device(device).type == "cpu" else mm.get_free_memory(device)


def auto_tile(vae, latent_shape, device, store_bytes: int) -> int:
    """The largest tile whose working memory, by the VAE's own estimate, fits what is free after the stored
    activations (CUDA free memory, or available RAM on the CPU)."""
    free = free_memory(device) - store_bytes
    side = max(latent_shape[2], latent_shape[3]) * 8
    for pixels in (1024, 768, 512, 384, 256, 128):
        lat = pixels // 8
        if vae.memory_used_decode((latent_shape[0], latent_shape[1], lat, lat), vae.vae_dtype) <= 0.5 * free \
                or pixels == 128:
            return min(pixels, max(MIN_TILE, side))
    return 128


def stored_bytes(model, latent_shape, dtype) -> int:
    """The most the exact mode keeps at once: at some level, a block's hidden and output activations plus the
    half-size input its first block recomputes the upsampling from."""
    dec: Decoder = model.decoder
    b, _, h, w = latent_shape
    size = torch.finfo(dtype).bits // 8
    most = 0
    for i, level in enumerate(dec.up):
        pixels = b * h * w * 4 ** (dec.num_resolutions - 1 - i)
        source = pixels // 4 if i < dec.num_resolutions - 1 else pixels
        most = max(most, pixels * 2 * level.block[-1].out_channels + source * level.block[0].in_channels)
    return most * size


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def plan_tiling(vae, job: TiledJob, tile: int | None, keep: str) -> Budget:
    """Load the VAE and settle, before any work, where whole activations live (refusing a job whose activations RAM
    cannot hold) and the tile size."""
    device = vae.device
    store_bytes = job.stored_bytes()
    mm.load_models_gpu([vae.patcher], memory_required=store_bytes, force_full_load=getattr(vae, "disable_offload", False))
    if keep not in KEEP:
        raise TiledVAEError(f"keep_activations {keep!r} is not one of {', '.join(KEEP)}.")
    on_device = device.type != "cpu" and (keep == "gpu" or (keep == "auto" and store_bytes < 0.6 * mm.get_free_memory(device)))
    store = device if on_device else torch.device("cpu")
    ram = host_free_memory() if store.type == "cpu" else None
    if ram is not None and store_bytes > 0.9 * ram:
        raise TiledVAEError(f"This image needs {store_bytes / 2**30:.1f} GiB of activations kept in RAM, more than the "
                            f"{ram / 2**30:.1f} GiB this process may still use (free RAM, or its "
                            "container's limit). Decode a smaller image, or free memory first.")
    if tile is None:
        tile = auto_tile(vae, job.latent_shape, device, store_bytes if store == device or device.type == "cpu" else 0)
    return job.budget(device, store, tile)


def after_out_of_memory(job: TiledJob, budget: Budget) -> Budget:
    """The next attempt's budget: activations moved to RAM, else the tile halved, else a clear refusal."""
    store, tile = budget.store, budget.tile
    if store.type != "cpu":
        store = torch.device("cpu")
        log.warning("Tiled VAE: out of memory; keeping whole activations in RAM instead and retrying")
    elif tile // 2 >= MIN_TILE:
        tile = tile // 2 - (tile // 2) % 8
        log.warning("Tiled VAE: out of memory; retrying with %d px tiles", tile)
    else:
        raise TiledVAEError(f"Out of memory even with {tile} px tiles and activations in RAM. Free memory (close "
                            "other programs, unload models) or run ComfyUI with --cpu-vae.")
    return job.budget(budget.device, store, tile)


def run_tiled(vae, job: TiledJob, tile: int | None, keep: str) -> torch.Tensor:
    """Run a job on the plan of plan_tiling, and on running out of memory move activations to RAM, then halve the
    tile, until it fits or the tile reaches the minimum."""
    budget = plan_tiling(vae, job, tile, keep)
    while True:
        try:
            with torch.inference_mode():
                return job.run(budget)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(e):
                raise
        mm.soft_empty_cache(True)
        budget = after_out_of_memory(job, budget)


# ---------------------------------------------------------------------------------------------------
# Fields: a (B, C, H, W) activation that can be read region by region, stored or computed on demand.

Region = tuple[int, int, int, int]  # y0, y1, x0, x1 (clipped to the field by the reader)


class Field:
    shape: tuple[int, int, int, int]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        raise NotImplementedError


class Stored(Field):
    """A whole activation in memory (on the compute device when it fits, else in RAM)."""

    def __init__(self, tensor: torch.Tensor, device, stats: GroupStats | None = None):
        self.tensor, self.device, self.shape, self.stats = tensor, device, tuple(tensor.shape), stats

    def read(self, y0, y1, x0, x1):
        return self.tensor[:, :, y0:y1, x0:x1].to(self.device, non_blocking=True)


class Pixels(Field):
    """ComfyUI IMAGE (B, H, W, 3) in 0..1, read as the VAE's input (B, 3, H, W) in -1..1."""

    def __init__(self, image: torch.Tensor, process_input, device, dtype):
        self.image, self.process_input, self.device, self.dtype = image, process_input, device, dtype
        self.shape = (image.shape[0], image.shape[3], image.shape[1], image.shape[2])

    def read(self, y0, y1, x0, x1):
        tile = self.image[:, y0:y1, x0:x1, :].to(self.device).movedim(-1, 1)
        return self.process_input(tile).to(self.dtype)


class Conv(Field):
    """conv(zero_pad(pre(upsample(source)))) computed for the requested region only.

    `up` is a nearest-neighbour upsampling of the source (the decoder's Upsample), `pre` a pointwise
    function (GroupNorm with whole-image statistics, then SiLU), applied before zero padding as in the
    network. Only 3x3 (stride 1, padding 1 or stride 2, padding (0, 1) as Downsample) and 1x1 convs occur.
    """

    def __init__(self, conv, source: Field, pre: Callable | None = None, up: int = 1):
        self.conv, self.source, self.pre, self.up = conv, source, pre, up
        b, _, h, w = source.shape
        self.k, self.stride = conv.kernel_size[0], conv.stride[0]
        self.pad = conv.padding[0]
        self.lead = self.pad if self.stride == 1 else 0  # Downsample pads (0, 1, 0, 1) itself, module padding 0
        hu, wu = h * up, w * up
        if self.stride == 1:
            oh, ow = hu + 2 * self.pad - self.k + 1, wu + 2 * self.pad - self.k + 1
        else:
            oh, ow = (hu + 1 - self.k) // self.stride + 1, (wu + 1 - self.k) // self.stride + 1
        self.shape = (b, conv.out_channels, oh, ow)

    def needs(self, y0, y1, x0, x1) -> tuple[Region, Region]:
        """The input region (in upsampled coordinates) an output region depends on, and the part of it
        inside the image; the rest is the network's zero padding."""
        s, k, lead = self.stride, self.k, self.lead
        want = (y0 * s - lead, (y1 - 1) * s - lead + k, x0 * s - lead, (x1 - 1) * s - lead + k)
        _, _, hs, ws = self.source.shape
        hu, wu = hs * self.up, ws * self.up
        return want, (max(0, want[0]), min(hu, want[1]), max(0, want[2]), min(wu, want[3]))

    def read(self, y0, y1, x0, x1):
        want, (cy0, cy1, cx0, cx1) = self.needs(y0, y1, x0, x1)
        if self.up == 1:
            x = self.source.read(cy0, cy1, cx0, cx1)
            return self.apply(self.pre(x) if self.pre is not None else x, want, (cy0, cy1, cx0, cx1))
        f = self.up
        sy0, sy1, sx0, sx1 = cy0 // f, (cy1 - 1) // f + 1, cx0 // f, (cx1 - 1) // f + 1
        x = self.source.read(sy0, sy1, sx0, sx1)
        if self.pre is not None:  # pointwise, so the same (and cheaper) before the upsampling
            x = self.pre(x)
        x = upsample_nearest(x, f)[:, :, cy0 - sy0 * f:cy1 - sy0 * f, cx0 - sx0 * f:cx1 - sx0 * f]
        return self.apply(x, want, (cy0, cy1, cx0, cx1))

    def apply(self, x: torch.Tensor, want: Region, have: Region) -> torch.Tensor:
        """The conv of input `x` (already through `pre`, covering `have`), zero-padded out to `want`."""
        pads = (have[2] - want[2], want[3] - have[3], have[0] - want[0], want[1] - have[1])
        p = self.pad
        if self.stride == 1 and p and all(0 <= d <= p for d in pads):
            # The module's own zero padding is the network's where the tile meets the image's border, so no copy
            # of the tile is padded (F.pad costs a fill and a copy of the whole input); inside the image the ring
            # the module computes from its padding is cut off. Output row i is input row have[0] + i.
            top, left = want[0] + p - have[0], want[2] + p - have[2]
            h, w = want[1] - want[0] - 2 * p, want[3] - want[2] - 2 * p
            return self.conv(x)[:, :, top:top + h, left:left + w]
        if any(pads):
            x = F.pad(x, pads)
        if self.stride == 1 and self.pad:
            # the module pads by itself; trim the extra ring it computes rather than re-implement its weight cast
            return self.conv(x)[:, :, self.pad:-self.pad, self.pad:-self.pad]
        return self.conv(x)


def upsample_nearest(x: torch.Tensor, factor: int) -> torch.Tensor:
    try:
        return F.interpolate(x, scale_factor=factor, mode="nearest")
    except RuntimeError:  # nearest is not implemented for bf16 on some builds
        return F.interpolate(x.float(), scale_factor=factor, mode="nearest").to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Whole-image GroupNorm statistics, summed over tiles.

class GroupStats:
    """Per (sample, group) element count, mean and sum of squared deviations (M2) in float64, over every tile of
    an activation: each tile's mean and variance come from one fused pass (var_mean, in fp32, over a view: no
    copy of the tile), and tiles are merged with Chan's parallel formula."""

    def __init__(self, batch: int, channels: int, groups: int, device):
        self.groups, self.channels = groups, channels
        self.mean = torch.zeros(batch, groups, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(batch, groups, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, tile: torch.Tensor) -> None:
        b, c, h, w = tile.shape
        t = tile.view(b, self.groups, c // self.groups, h, w)  # splits the channel dim: a view for any strides
        if t.dtype != torch.float32:  # bf16/fp16: a reduction would round its mean and variance to the input dtype
            t = t.float()
        var, mean = torch.var_mean(t, dim=(2, 3, 4), correction=0)
        n = (c // self.groups) * h * w
        total = self.count + n
        delta = mean.double() - self.mean
        self.m2 += var.double() * n + delta.square() * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def mean_rstd(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        var = (self.m2 / self.count).clamp_min(0)
        return self.mean.float(), torch.rsqrt(var + eps).float()


def norm_silu(norm, stats: GroupStats) -> Callable[[torch.Tensor], torch.Tensor]:
    """GroupNorm with whole-image statistics (and the module's own affine), then SiLU.

    As PyTorch's own GroupNorm kernels do, the statistics and the affine fold into a per-channel scale and shift
    (y = x * rstd * weight + (bias - mean * rstd * weight)), so a tile costs one fused multiply-add and an
    in-place SiLU, in fp32, rather than a pass per operation."""
    mean, rstd = stats.mean_rstd(norm.eps)
    per_group = stats.channels // stats.groups
    folded: dict = {}

    def scale_shift(device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in folded:
            scale = rstd.to(device).repeat_interleave(per_group, dim=1)  # (B, C)
            shift = -mean.to(device).repeat_interleave(per_group, dim=1) * scale
            if norm.weight is not None:
                weight = mm.cast_to(norm.weight, torch.float32, device)
                scale = scale * weight
                shift = shift * weight
            if norm.bias is not None:
                shift = shift + mm.cast_to(norm.bias, torch.float32, device)
            folded[device] = (scale[:, :, None, None], shift[:, :, None, None])
        return folded[device]

    def apply(x: torch.Tensor) -> torch.Tensor:
        scale, shift = scale_shift(x.device)
        y = torch.addcmul(shift, x, scale)  # fp32 (promoted) for a bf16/fp16 x too
        return F.silu(y, inplace=True).to(x.dtype)

    return apply


# ---------------------------------------------------------------------------------------------------
# The layer-by-layer runner.

@dataclass
class Budget:
    """Where whole activations live, how big a tile is, and the progress bar every tile ticks."""
    device: torch.device
    dtype: torch.dtype
    store: torch.device
    tile: int  # pixels of the image side; scaled to each layer's resolution
    image_side: int
    pbar: object = None

    @property
    def whole(self) -> bool:
        """One tile covers the image: run the plain network (core's full decode), which skips the extra
        statistics passes."""
        return self.tile >= self.image_side

    def tiles(self, h: int, w: int):
        side = max(1, round(self.tile * max(h, w) / self.image_side))
        for y0 in range(0, h, side):
            for x0 in range(0, w, side):
                yield y0, min(h, y0 + side), x0, min(w, x0 + side)

    def tick(self):
        mm.throw_exception_if_processing_interrupted()
        if self.pbar is not None:
            self.pbar.update(1)


def count_tiles(budget: Budget, h: int, w: int) -> int:
    return sum(1 for _ in budget.tiles(h, w))


def stats_of(field: Field, groups: int, budget: Budget) -> GroupStats:
    if isinstance(field, Stored) and field.stats is not None:
        return field.stats
    b, c, h, w = field.shape
    stats = GroupStats(b, c, groups, budget.device)
    for region in budget.tiles(h, w):
        stats.add(field.read(*region))
        budget.tick()
    return stats


def materialise(field: Field, groups: int, budget: Budget, out: torch.Tensor | None = None) -> Stored:
    """Compute a field tile by tile into a whole tensor, with its GroupNorm statistics on the way."""
    b, c, h, w = field.shape
    if out is None:
        out = torch.empty((b, c, h, w), dtype=budget.dtype, device=budget.store)
    stats = GroupStats(b, c, groups, budget.device)
    for region in budget.tiles(h, w):
        y0, y1, x0, x1 = region
        tile = field.read(*region)
        stats.add(tile)
        out[:, :, y0:y1, x0:x1] = tile.to(out.device, non_blocking=True)
        budget.tick()
    return Stored(out, budget.device, stats)


def resnet_block(block: ResnetBlock, x: Field, budget: Budget) -> Stored:
    """x + conv2(silu(gn2(conv1(silu(gn1(x)))))), both norms with whole-image statistics.

    Pass 1 reads each tile of x once (with conv1's one-pixel border) and writes conv1's output and the
    shortcut; pass 2 adds conv2's output. When the channels match and x is stored, the output overwrites x
    itself (x is not read after pass 1), so a block keeps only two whole activations.
    """
    b, cin, h, w = x.shape
    cout = block.out_channels
    conv1 = Conv(block.conv1, x, pre=norm_silu(block.norm1, stats_of(x, block.norm1.num_groups, budget)))
    hidden = torch.empty((b, cout, h, w), dtype=budget.dtype, device=budget.store)
    hidden_stats = GroupStats(b, cout, block.norm2.num_groups, budget.device)
    in_place = isinstance(x, Stored) and cin == cout and x.tensor.dtype == budget.dtype
    out = x.tensor if in_place else torch.empty((b, cout, h, w), dtype=budget.dtype, device=budget.store)
    for y0, y1, x0, x1 in budget.tiles(h, w):
        want, have = conv1.needs(y0, y1, x0, x1)
        xr = x.read(*have)
        tile = conv1.apply(conv1.pre(xr), want, have)
        hidden_stats.add(tile)
        hidden[:, :, y0:y1, x0:x1] = tile.to(hidden.device, non_blocking=True)
        if not in_place:
            core = xr[:, :, y0 - have[0]:y1 - have[0], x0 - have[2]:x1 - have[2]]
            out[:, :, y0:y1, x0:x1] = shortcut(block, core, xr, want, have, (y0, y1, x0, x1)).to(out.device)
        budget.tick()
    conv2 = Conv(block.conv2, Stored(hidden, budget.device), pre=norm_silu(block.norm2, hidden_stats))
    out_stats = GroupStats(b, cout, block.norm1.num_groups, budget.device)
    for y0, y1, x0, x1 in budget.tiles(h, w):
        tile = conv2.read(y0, y1, x0, x1) + out[:, :, y0:y1, x0:x1].to(budget.device)
        out_stats.add(tile)
        out[:, :, y0:y1, x0:x1] = tile.to(out.device, non_blocking=True)
        budget.tick()
    return Stored(out, budget.device, out_stats)


def shortcut(block: ResnetBlock, core: torch.Tensor, xr: torch.Tensor, want: Region, have: Region,
             region: Region) -> torch.Tensor:
    if block.in_channels == block.out_channels:
        return core
    if block.use_conv_shortcut:  # a 3x3 conv: it needs the same border conv1 read
        return Conv(block.conv_shortcut, Stored(xr, xr.device)).apply(xr, want, have)
    return block.nin_shortcut(core)


def whole(field: Field, budget: Budget) -> torch.Tensor:
    """A field as one tensor on the compute device (the latent-resolution middle is small)."""
    _, _, h, w = field.shape
    return field.read(0, h, 0, w) if isinstance(field, Stored) else materialise(field, 32, budget).tensor.to(budget.device)


def global_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """A VAE self-attention block on the whole activation, exactly, in bounded memory: queries go through
    scaled-dot-product attention a chunk at a time. (ComfyUI's split attention, its choice on the CPU, holds
    the whole N x N matrix: 17 GB for the 65 536 latent pixels of a 2048² image.)"""
    if not all(hasattr(attn, name) for name in ("norm", "q", "k", "v", "proj_out")):
        return attn(x)  # an attention block of another shape: its own forward
    h = attn.norm(x)
    b, c, hh, ww = x.shape
    # contiguous (B, 1, N, C), as core passes them: SDPA's fused kernels need a unit-stride last dimension
    q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3).contiguous() for t in (attn.q(h), attn.k(h), attn.v(h)))
    del h
    n = hh * ww
    out = torch.empty_like(q)
    elements = ATTENTION_CHUNK_ELEMENTS
    if q.device.type == "cuda" and torch.version.hip is None:
        fits = mm.get_free_memory(q.device) // (3 * 2 * q.element_size())  # logits + softmax, with a margin
        elements = max(ATTENTION_CHUNK_ELEMENTS, min(ATTENTION_CHUNK_ELEMENTS_CUDA, fits))
    chunk = max(1, elements // (b * n))
    for i in range(0, n, chunk):
        mm.throw_exception_if_processing_interrupted()  # the whole image's attention can run for a minute on a CPU
        out[:, :, i:i + chunk] = F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v)
    del q, k, v
    return x + attn.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


def decode_exact(model: AutoencodingEngineLegacy, z: torch.Tensor, budget: Budget) -> torch.Tensor:
    """The decoder, layer by layer; returns the image (B, 3, H, W) in the VAE's output range on budget.store."""
    dec: Decoder = model.decoder
    h = dec.mid.block_2(global_attention(dec.mid.attn_1, dec.mid.block_1(dec.conv_in(model.post_quant_conv(z)))))
    x: Field = Stored(h.to(budget.store), budget.device)
    del h
    for i_level in reversed(range(dec.num_resolutions)):
        level = dec.up[i_level]
        for i_block, block in enumerate(level.block):
            x = resnet_block(block, x, budget)
            if len(level.attn) > 0:  # attention inside the up path is global: run it whole
                x = Stored(global_attention(level.attn[i_block], whole(x, budget)).to(budget.store), budget.device)
        if i_level != 0:
            up = level.upsample
            x = Conv(up.conv, x, up=2) if up.with_conv else materialise(Upscaled(x), 32, budget)
    image = Conv(dec.conv_out, x, pre=norm_silu(dec.norm_out, stats_of(x, dec.norm_out.num_groups, budget)))
    b, c, hh, ww = image.shape
    out = torch.empty((b, c, hh, ww), dtype=torch.float32, device=mm.intermediate_device())
    for y0, y1, x0, x1 in budget.tiles(hh, ww):
        tile = image.read(y0, y1, x0, x1)
        if dec.tanh_out:
            tile = torch.tanh(tile)
        out[:, :, y0:y1, x0:x1] = tile.to(out.device).float()
        budget.tick()
    return out


class Upscaled(Field):
    """Nearest 2x upsampling without a conv (Upsample(with_conv=False))."""

    def __init__(self, source: Field):
        self.source = source
        b, c, h, w = source.shape
        self.shape = (b, c, 2 * h, 2 * w)

    def read(self, y0, y1, x0, x1):
        x = self.source.read(y0 // 2, (y1 - 1) // 2 + 1, x0 // 2, (x1 - 1) // 2 + 1)
        return upsample_nearest(x, 2)[:, :, y0 % 2:y0 % 2 + y1 - y0, x0 % 2:x0 % 2 + x1 - x0]


def encode_exact(model: AutoencodingEngineLegacy, pixels: Field, budget: Budget) -> torch.Tensor:
    """The encoder, layer by layer; returns the latent (what the VAE's own encode returns)."""
    enc: Encoder = model.encoder
    x: Field = Conv(enc.conv_in, pixels)
    for i_level in range(enc.num_resolutions):
        level = enc.down[i_level]
        for i_block, block in enumerate(level.block):
            x = resnet_block(block, x, budget)
            if len(level.attn) > 0:
                x = Stored(global_attention(level.attn[i_block], whole(x, budget)).to(budget.store), budget.device)
        if i_level != enc.num_resolutions - 1:
            down = level.downsample
            if not down.with_conv:
                raise TiledVAEError("This VAE's encoder downsamples by average pooling, which the tiled encode does "
                                    "not support; use core VAE Encode (Tiled).")
            x = Conv(down.conv, x)
    h = whole(x, budget)
    h = enc.mid.block_2(global_attention(enc.mid.attn_1, enc.mid.block_1(h)))
    h = enc.conv_out(F.silu(enc.norm_out(h)))
    z = model.quant_conv(h)
    z, _ = model.regularization(z)
    return z


NODES = [ZImageTiledVAEDecode, ZImageTiledVAEEncode]  # what this module adds to ComfyUI
