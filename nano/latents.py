"""The latent space the VAE is taught: ComfyUI's Flux latent format, the shape and colour codes held in its last
channels, and what the decoder and the DiTs' losses make of it.

The shape codes: the VAE's last four latent channels hold, per 8x8 block, how much of it each shape kind covers. A DiT
then paints a shape the way it paints a colour, as a value over the object's footprint, and the decoder (trained on
blurred, noisy latents too, `degrade_latents`) draws the outline; left free, the DiT drew every shape as a blob.
The colour codes: the three channels before them hold, per 8x8 block, which object colour covers it, each colour a
direction of its own (+-axis; the pairs that share an axis are far apart anyway), so that no two colours lie close
in the latent, where the DiTs mixed them up. docs/nano-recipe.md has the measurements behind both.
"""
from __future__ import annotations

import random

import torch

from . import scenes
from .models import VAE_CONFIG

LATENT_SHIFT, LATENT_SCALE = 0.1159, 0.3611  # ComfyUI's Flux latent format, which Z-Image uses
SHAPE_CODES = slice(12, 16)
SHAPE_CODE_SCALE, CODE_GAIN = 2.0, 4.0
CODE_LOSS_WEIGHT = 4.0  # the DiT read the shape words weakly; with the codes weighted up it learns them sooner
COLOUR_CODES = slice(9, 12)
COLOUR_CODE_AXES = {"red": (0, 1), "green": (0, -1), "orange": (1, 1), "blue": (1, -1), "yellow": (2, 1), "purple": (2, -1)}
COLOUR_CODE_LOSS_WEIGHT = 2.0
EDIT_CHANGE_THRESHOLD = 1.5  # normalised latent units: the edited object moves its blocks by 2-4, the rest by under 1


def shape_code_targets(masks: torch.Tensor) -> torch.Tensor:
    """Per 8x8 block, SHAPE_CODE_SCALE x min(1, CODE_GAIN x the block's coverage by each shape kind): a block an
    object's tip barely touches still says loudly which kind it belongs to, where plain coverage was a whisper."""
    return SHAPE_CODE_SCALE * (torch.nn.functional.avg_pool2d(masks, 8) * CODE_GAIN).clamp(max=1.0)


def colour_code_targets(masks: torch.Tensor) -> torch.Tensor:
    """From per-colour coverage (B, 6, H, W; `scenes.render_colour_masks`), per 8x8 block the sum of each colour's
    direction (COLOUR_CODE_AXES) times its loudness, as `shape_code_targets` measures it; 0 where only background."""
    directions = torch.zeros(len(scenes.OBJECT_COLOURS), COLOUR_CODES.stop - COLOUR_CODES.start)
    for k, colour in enumerate(scenes.OBJECT_COLOURS):
        axis, sign = COLOUR_CODE_AXES[colour]
        directions[k, axis] = sign
    return torch.einsum("bkhw,kc->bchw", shape_code_targets(masks), directions.to(masks.device))


def channel_weights(device) -> torch.Tensor:
    """The loss weight of each latent channel: the shape codes count CODE_LOSS_WEIGHT times, the colour codes
    COLOUR_CODE_LOSS_WEIGHT times (mean 1)."""
    w = torch.ones(VAE_CONFIG["z_channels"], device=device)
    w[SHAPE_CODES] = CODE_LOSS_WEIGHT
    w[COLOUR_CODES] = COLOUR_CODE_LOSS_WEIGHT
    return (w / w.mean()).view(1, -1, 1, 1)


def edit_region_weights(before: torch.Tensor, after: torch.Tensor, focus: float, objects: bool = False) -> torch.Tensor:
    """Per latent pixel, 1 + `focus` where the edit changed the picture (and one block around it), scaled to mean 1:
    the edit touches a twentieth of the latent, so in the plain loss copying the rest drowned out the edit.
    `objects`: the focus also covers the objects the edit leaves alone (wherever the input differs from its
    background, the per-channel median), so recolouring or moving a neighbour too costs as much as missing the edit."""
    before = before.float()
    region = (after.float() - before).abs().amax(dim=1, keepdim=True) * LATENT_SCALE > EDIT_CHANGE_THRESHOLD
    if objects:
        background = before.flatten(2).median(dim=2).values[:, :, None, None]
        region |= (before - background).abs().amax(dim=1, keepdim=True) * LATENT_SCALE > EDIT_CHANGE_THRESHOLD
    changed = torch.nn.functional.max_pool2d(region.float(), 3, stride=1, padding=1)
    w = 1.0 + focus * changed
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


# ---------------------------------------------------------------------------------------------------
# What the decoder learns to read: latents degraded the way a DiT's samples are.

def blur3(t: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur that keeps the edges' level (the padding is not averaged in)."""
    return torch.nn.functional.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)


def degrade_latents(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a DiT's samples look like to the decoder, which learns to draw crisp outlines from them rather than trust
    every latent pixel: half the batch blurred (by a random amount) and noised; then a quarter with only the colour
    channels blurred, the shape codes kept, so the outline is drawn from the codes (which a DiT gets right far more
    often than the exact footprint: docs/nano-recipe.md)."""
    b = z.shape[0]
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).to(z.device)
    amount = torch.rand(b, 1, 1, 1, generator=gen).to(z.device)
    noise = torch.randn(z.shape, generator=gen).to(z.device) * 0.3 * torch.rand(b, 1, 1, 1, generator=gen).to(z.device)
    blurred = blur3(z)
    std = z.detach().std(dim=(0, 2, 3), keepdim=True)
    out = torch.where(pick, torch.lerp(z, blurred, amount) + noise * std, z)
    colour_only = (torch.rand(b, 1, 1, 1, generator=gen) < 0.25).to(z.device)
    blurred[:, SHAPE_CODES] = z[:, SHAPE_CODES]
    return torch.where(colour_only, blurred, out)


def fat_footprints(z: torch.Tensor, degraded: torch.Tensor, gen: torch.Generator, share: float) -> torch.Tensor:
    """For `share` of the batch, the clean latents with the colour channels blurred once or twice (3x3) and the shape
    codes kept, else `degraded`. A DiT paints a star's colour a little wider than its outline while its codes say
    "star" as loudly as a render's; the decoder drew those as fat stars, read as triangles (docs/nano-recipe.md)."""
    b = z.shape[0]
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < share).to(z.device)
    twice = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).to(z.device)
    once = blur3(z)
    wide = torch.where(twice, blur3(once), once)
    wide[:, SHAPE_CODES] = z[:, SHAPE_CODES]
    return torch.where(pick, wide, degraded)


def mottled_colours(z: torch.Tensor, gen: torch.Generator, share: float, size: float) -> torch.Tensor:
    """For `share` of the batch, the colour channels drift smoothly across the picture: a random field drawn at 4x4
    and upsampled, its norm up to `size` normalised latent units; the shape codes are kept. A DiT paints an object's
    colour drifting a little, which a decoder shown only clean latents draws as two colours (two objects to the
    detector); shown small drifts, it draws one clean colour through them (docs/nano-recipe.md)."""
    b, colours = z.shape[0], SHAPE_CODES.start
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < share).float()
    field = torch.nn.functional.interpolate(torch.randn(b, colours, 4, 4, generator=gen), size=z.shape[-2:],
                                            mode="bilinear", align_corners=False)
    field = field / field.norm(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    scale = torch.rand(b, 1, 1, 1, generator=gen) * size / LATENT_SCALE  # raw latent units
    out = z.clone()
    out[:, :colours] += (pick * scale * field).to(z.device, z.dtype)
    return out


def edge_weights(x: torch.Tensor, edge: float) -> torch.Tensor:
    """Per pixel, 1 + `edge` on and next to an outline (a colour step in the image), else 1. The plain loss let the
    decoder round off a small star's points, which the detector then read as a triangle or circle."""
    step = (x - blur3(x)).abs()
    outline = (step.amax(dim=1, keepdim=True) > 0.02).float()
    return 1.0 + edge * torch.nn.functional.max_pool2d(outline, 3, stride=1, padding=1)


def crop_pairs(z: torch.Tensor, x: torch.Tensor, size: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent cut to a random size x size window and its picture to the same 8x larger window."""
    zs, xs = [], []
    for i in range(z.shape[0]):
        top, left = rng.randrange(z.shape[-2] - size + 1), rng.randrange(z.shape[-1] - size + 1)
        zs.append(z[i, :, top:top + size, left:left + size])
        xs.append(x[i, :, 8 * top:8 * (top + size), 8 * left:8 * (left + size)])
    return torch.stack(zs), torch.stack(xs)
