"""Train the nano Z-Image family from scratch: VAE, then text encoder + nano-base, then nano-turbo and nano-edit.

    python -m nano.train                       # the whole family into models/, work files in .cache/nano-train
    python -m nano.train --quick               # a few steps on a few samples (what the test runs)
    python -m nano.train --minutes 30          # on a GPU: train for about 30 minutes (the GPU plan)

Every stage is seeded and checkpoints itself (safetensors + JSON) every few minutes, so a stopped run
resumes where it was by running the same command again; finished stages are skipped. Uses CUDA when
torch sees it, with the GPU plan: more data, batches of 512 and as many steps as each stage's share of
`--minutes` allows (the step count is fixed after the first steps are timed, and kept on resume). The DiTs and
the VAE train with PyTorch's fused attention; on the CPU the DiTs and the data set's encoding also run under
torch.compile.
Writes the shipped weights (fp16 safetensors with `zimage.*` metadata) and a report (`training-report.json`,
`training-loss.png`).

The models are ComfyUI's own classes (NextDiT with Z-Image modulation, its Qwen3 code, the ldm
AutoencoderKL), so what is trained here is exactly what the loader builds at inference.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from zimage_client.runtime import REPO_ROOT, import_comfy, import_plugin

import_comfy()

import comfy.ops  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402
from comfy.text_encoders.z_image import ZImageTokenizer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from . import scenes  # noqa: E402

import_plugin()
from comfyui_zimage.nodes.checkpoint_format import APPENDED_REFERENCES, REFERENCE_LAYOUT_KEY  # noqa: E402
from comfyui_zimage.nodes.compat import make_llama_blocks_trainable, training_mode  # noqa: E402
from comfyui_zimage.nodes.edit import NextDiTWithReference  # noqa: E402
from comfyui_zimage.nodes.loader import qwen3_model_class  # noqa: E402

OPS = comfy.ops.disable_weight_init
LATENT_SHIFT, LATENT_SCALE = 0.1159, 0.3611  # ComfyUI's Flux latent format, which Z-Image uses
# The shape codes: the VAE's last four latent channels are taught to hold, per 8x8 block, how much of it each
# shape kind covers (x2). A DiT then paints a shape the way it paints a colour, as a value over the object's
# footprint, and the decoder (trained on blurred, noisy latents too) draws the outline; left free, the DiT drew
# every shape as a blob (docs/nano-recipe.md).
SHAPE_CODES = slice(12, 16)
SHAPE_CODE_SCALE, CODE_GAIN = 2.0, 4.0
CODE_LOSS_WEIGHT = 4.0  # the DiT read the shape words weakly; with the codes weighted up it learns them sooner
# The colour codes: three channels before the shape codes hold, per 8x8 block, which object colour covers it, each
# colour a direction of its own (+-axis; the pairs that share an axis are far apart anyway). Left free, the encoder put
# orange and yellow 1.3 apart in the latent (purple and blue 2.6, red and orange 2.8; other pairs up to 9.6), and those
# were the colours the DiTs mixed up: orange objects shading into yellow, purple recoloured blue (docs/nano-recipe.md).
COLOUR_CODES = slice(9, 12)
COLOUR_CODE_AXES = {"red": (0, 1), "green": (0, -1), "orange": (1, 1), "blue": (1, -1), "yellow": (2, 1), "purple": (2, -1)}
COLOUR_CODE_LOSS_WEIGHT = 2.0
SAMPLING_SHIFT = 3.0
PAD_ID = 151643  # Qwen's <|endoftext|>: the pad token of ComfyUI's Z-Image tokenizer

VAE_CONFIG = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TE_CONFIG = dict(vocab_size=151936, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
DIT_CONFIG = dict(patch_size=2, in_channels=16, dim=256, n_layers=3, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                  multiple_of=512, ffn_dim_multiplier=2.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
                  axes_dims=[16, 24, 24], axes_lens=[1536, 512, 512], rope_theta=256.0, z_image_modulation=True,
                  time_scale=1000.0, pad_tokens_multiple=32)


@dataclass
class Plan:
    """Sizes and step counts; `quick` shrinks everything to prove the pipeline in a minute."""
    scenes: int = 16000
    edit_pairs: int = 20000  # 6000 pairs were learnt by heart: the edited region's error on new pairs stayed high
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 48
    decoder_steps: int = 2500   # on windows (`decoder_crop`), then `decoder_whole_steps` on whole pictures: the round
    decoder_batch: int = 8      # trip of the eval's scenes and edits reads 100 % (the windows alone: 94.5 and 28 %)
    decoder_edge: float = 4.0   # extra pixel-loss weight on objects' outlines (0: the plain loss)
    decoder_fat: float = 0.5    # share of decoder batches whose colour footprints are widened (`fat_footprints`)
    decoder_mottle: float = 0.5       # share of decoder batches whose colours drift smoothly (`mottled_colours`)
    decoder_mottle_size: float = 0.6  # how far, at most (normalised latent units; free, orange to yellow was 1.3)
    decoder_crop: int = 64  # px: the decoder learns on windows of whole images' latents (0: whole images)
    decoder_whole_steps: int = 600  # then on whole images (`finetune_decoder`; its loss was flat after 600 of 1000)
    base_steps: int = 8000  # 99.8 % (bar 90); 5000 scored 90.9, and edit stages on that base were weaker (docs/nano-recipe.md)
    turbo_steps: int = 300  # 99.6 %, base 99.8 (500 read 99.8, 800 96-99.6)
    edit_steps: int = 3600  # 86 %, in 116.5 min of stage clocks (4000 read 87 % in 122.4 min)
    batch: int = 32
    lr: float = 5e-4
    zh_share: float = 0.52   # Chinese captions: at least half of training (at 0.55 English trailed by 2.5-7 points)
    drop_caption: float = 0.1  # caption dropout, so CFG has an unconditional model to push against
    teacher_cfg: float = 4.0
    turbo_steps_sampler: int = 8
    minutes: float = 0.0      # > 0: the stages' steps are caps, each stage trains for its share of these minutes
    ema_base: float = 0.998
    edit_focus: float = 8.0   # extra loss weight where an edit changes the latent (0: the plain flow loss)
    edit_focus_objects: bool = True  # and on the objects it leaves alone: with the focus on the edit only, a neighbour
    #                                  cost 1/9 as much, and nano-edit recoloured it too (recolours among 2-3 objects: 3 of 25
    #                                  right, with this 19 of 25; 67 -> 87 % in all)
    edit_move_share: float = 0.0  # share of edit samples that are moves (0: as drawn, 0.23); 0.45 lifted moves a
    #                               little (21 of 26 against 14, the earlier check) and the whole by the stricter one 3 points
    edit_lone_share: float = 0.1  # share of edit samples with one object alone (0: as drawn, a third): they read 41 of 41,
    #                               while which object an instruction names is learnt on the scenes of two and three

    @classmethod
    def quick(cls):
        return cls(scenes=48, edit_pairs=24, vae_steps=3, vae_batch=2, decoder_steps=2, decoder_whole_steps=2, decoder_batch=2,
                   base_steps=3, turbo_steps=2, edit_steps=2, batch=4)

    @classmethod
    def gpu(cls, minutes: float):
        """On a GPU a step of these tiny models costs its launches and Python, not its arithmetic (an H200 did a
        base step in 59 ms at batch 128 and 127 ms at 512, with the GPU busy 10 ms of it), so the GPU plan takes
        big batches: 6x the data, 16x the batch, for as many steps as the time allows."""
        return cls(scenes=100_000, edit_pairs=40_000, vae_steps=4000, vae_batch=32, vae_crop=64, decoder_steps=2000,
                   decoder_batch=32, base_steps=100_000, turbo_steps=10_000, edit_steps=40_000, batch=512, lr=8e-4,
                   minutes=minutes, ema_base=0.999)

    def stage_minutes(self, name: str) -> float:
        """Each stage's share of `minutes` (base learns the most, so it gets the most)."""
        share = {"vae": 0.09, "vae-decoder": 0.04, "vae-decoder-whole": 0.02, "base": 0.5, "turbo": 0.13, "edit": 0.22}[name]
        return self.minutes * share


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ---------------------------------------------------------------------------------------------------
# Modules and their initialisation (ComfyUI's ops leave weights uninitialised).

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


# ---------------------------------------------------------------------------------------------------
# Checkpoints: tensors in safetensors, everything else in JSON (no pickle anywhere).

def save_checkpoint(path: Path, modules: dict, optimizer, state: dict) -> None:
    tensors = {f"{label}.{k}": v.detach().cpu().contiguous()
               for label, module in modules.items() for k, v in module.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        for k, v in entry.items():
            tensors[f"opt.{index}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})
    tmp.replace(path)


def load_checkpoint(path: Path, modules: dict, optimizer) -> dict:
    tensors = load_file(str(path))
    for label, module in modules.items():
        prefix = f"{label}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    sd = optimizer.state_dict()
    sd["state"] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            sd["state"].setdefault(int(index), {})[name] = v
    optimizer.load_state_dict(sd)
    return json.loads(file_metadata(path)["state"])


def file_metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


class Stage:
    """A resumable training loop: `step_fn(step) -> loss` runs `steps` times, checkpointing as it goes."""

    UNTIMED, TIMED = 10, 30  # with a time budget: 30 steps are timed, after 10 untimed ones, to fix the step count

    def __init__(self, name: str, work: Path, modules: dict, optimizer, steps: int, lr: float, warmup: int = 100,
                 minutes: float = 0.0):
        self.name, self.work, self.modules, self.optimizer = name, work, modules, optimizer
        self.steps, self.lr, self.minutes, self.max_warmup = steps, lr, minutes, warmup
        self.path = work / f"{name}.ckpt.safetensors"
        self.state = {"step": 0, "losses": [], "seconds": 0.0}
        if self.path.exists():
            self.state = load_checkpoint(self.path, modules, optimizer)
            self.steps = self.state.get("steps", steps)
            log(f"{name}: resuming at step {self.state['step']}/{self.steps}")

    def fix_steps(self, seconds_per_step: float, step: int) -> None:
        """Fit the stage into its minutes: the schedule (warm-up, cosine decay) is then laid out over that many steps."""
        fitted = int(self.minutes * 60 / max(seconds_per_step, 1e-6))
        self.steps = max(step + 1, min(self.steps, fitted))
        self.state["steps"] = self.steps
        log(f"{self.name}: {seconds_per_step * 1000:.1f} ms per step -> {self.steps} steps in {self.minutes:.1f} min")

    @property
    def warmup(self) -> int:
        """Learning-rate warm-up steps: at most a fifth of the stage, however its step count was set."""
        return min(self.max_warmup, max(1, self.steps // 5))

    def learning_rate(self, step):
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def run(self, step_fn, ema=None):
        last_save, start = time.time(), time.time() - self.state["seconds"]
        window, timer = [], None  # timer: (clock, step) where timing began, in this process (a resume times anew)
        while self.state["step"] < self.steps:
            step = self.state["step"]
            if self.minutes > 0 and "steps" not in self.state:
                if timer is None and step >= self.UNTIMED:
                    timer = (time.perf_counter(), step)
                elif timer is not None and step == timer[1] + self.TIMED:
                    self.fix_steps((time.perf_counter() - timer[0]) / self.TIMED, step)
            for g in self.optimizer.param_groups:
                g["lr"] = self.learning_rate(step) * g.get("lr_scale", 1.0)
            with training_mode():
                loss = step_fn(step)
            if ema is not None:
                ema.update(step)
            window.append(loss)
            self.state["step"] = step + 1
            if len(window) == 20 or self.state["step"] == self.steps:
                self.state["losses"].append([self.state["step"], float(np.mean(window))])
                log(f"{self.name} step {self.state['step']}/{self.steps} loss {np.mean(window):.4f}")
                window = []
            if time.time() - last_save > 180 or self.state["step"] == self.steps:
                self.state["seconds"] = time.time() - start
                save_checkpoint(self.path, self.modules, self.optimizer, self.state)
                last_save = time.time()
        return self.state


class EMA(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.model, self.decay = [model], decay
        self.shadow = torch.nn.ParameterDict()
        for k, v in model.state_dict().items():
            self.shadow[k.replace(".", "__")] = torch.nn.Parameter(v.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def update(self, step: int):
        """The decay warms up ((1 + step) / (10 + step) until it reaches `decay`): a fixed 0.999 over a short
        run would still hold a quarter of the random initial weights after 1300 steps (a GPU run did)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in self.model[0].state_dict().items():
            s = self.shadow[k.replace(".", "__")]
            if v.is_floating_point():
                s.lerp_(v, 1 - decay)

    def state(self) -> dict:
        return {k.replace("__", "."): v.detach().clone() for k, v in self.shadow.items()}


def optimise(opt, loss, params) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def make_optimizer(groups):
    # fused: one kernel for all parameters (on 2 CPU threads a step of base's 9.5 M parameters took 21 ms, fused 7.5)
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8, fused=True)


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


def compiled(fn, enabled: bool):
    """`fn` (a module or a method) under torch.compile when `enabled`; parameters, state dict and EMA stay the
    module's own. On 2 CPU cores the DiT's norms, modulation and RoPE are many small memory-bound ops: fused, its
    training steps are about 1.45x faster, and so is the VAE's encoding (bench/bench_train_speed.py). Batches keep one
    shape, so each use compiles once; where compiling fails (no C++ compiler) dynamo runs `fn` eagerly instead."""
    if not enabled:
        return fn
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    # base, the teacher and student of turbo, and edit each add entries for the same forward code
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------------
# Stage 1: the VAE, on random crops (it is fully convolutional, and crops are 7x cheaper than whole images).

def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


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
    and upsampled, its norm up to `size` normalised latent units; the shape codes are kept. Before the colour codes,
    orange and yellow lay 1.3 apart in the latent (red and orange 2.8), and the DiT painted orange objects drifting
    from orange to yellow, which the detector reads as two objects. Shown drifts under half that distance, the decoder
    learnt to draw one clean colour through the small ones (docs/nano-recipe.md)."""
    b, colours = z.shape[0], SHAPE_CODES.start
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < share).float()
    field = torch.nn.functional.interpolate(torch.randn(b, colours, 4, 4, generator=gen), size=z.shape[-2:],
                                            mode="bilinear", align_corners=False)
    field = field / field.norm(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    scale = torch.rand(b, 1, 1, 1, generator=gen) * size / LATENT_SCALE  # raw latent units
    out = z.clone()
    out[:, :colours] += (pick * scale * field).to(z.device, z.dtype)
    return out


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


def train_vae(work: Path, plan: Plan, device, seed: int) -> VAE:
    vae = VAE()
    vae.reset(seed)
    vae.to(device)
    opt = make_optimizer([{"params": vae.parameters()}])
    stage = Stage("vae", work, {"vae": vae}, opt, plan.vae_steps, lr=1e-3, minutes=plan.stage_minutes("vae"))

    def step_fn(step):
        rng = random.Random(seed * 7919 + step)
        imgs, shapes, colours = [], [], []
        for _ in range(plan.vae_batch):
            scene = scenes.random_edit_pair(rng).before if rng.random() < 0.4 else scenes.random_group_scene(rng, held_out=None)
            c = plan.vae_crop
            x0, y0 = rng.randrange(0, scenes.SIZE - c + 1, 8), rng.randrange(0, scenes.SIZE - c + 1, 8)
            imgs.append(scenes.render(scene).crop((x0, y0, x0 + c, y0 + c)))
            objects = scenes.render_object_masks(scene)[:, y0:y0 + c, x0:x0 + c]
            shapes.append(scenes.masks_by(scene, objects, "shape"))
            colours.append(scenes.masks_by(scene, objects, "colour"))
        x = images_to_tensor(imgs).to(device)
        mean, logvar = vae.encode(x)
        gen = torch.Generator().manual_seed(step)
        eps = torch.randn(mean.shape, generator=gen, device="cpu").to(device)
        z = mean + eps * (0.5 * logvar).exp()
        rec = vae.decode(degrade_latents(z, gen))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-4 * kl
        shape_target = shape_code_targets(torch.from_numpy(np.stack(shapes))).to(device)
        colour_target = colour_code_targets(torch.from_numpy(np.stack(colours))).to(device)
        loss = loss + (mean[:, SHAPE_CODES] - shape_target).pow(2).mean() + (mean[:, COLOUR_CODES] - colour_target).pow(2).mean()
        return optimise(opt, loss, vae.parameters())

    stage.run(step_fn)
    return vae


def edge_weights(x: torch.Tensor, edge: float) -> torch.Tensor:
    """Per pixel, 1 + `edge` on and next to an outline (a colour step in the image), else 1. The plain loss let the
    decoder round off a small star's points, which the detector then read as a triangle or circle: small stars
    were 11 of the 12 misread round trips of the evaluation's scenes (docs/nano-recipe.md)."""
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


def finetune_decoder(work: Path, plan: Plan, vae: VAE, device, seed: int, whole: bool = False) -> None:
    """The encoder's mid-block attention is global, so whole images give latents that crops never showed the
    decoder. With the encoder frozen (the data set's latents do not change), teach the decoder whole images' latents,
    with the outlines weighted up (`edge_weights`) and, in some latents, the colour wider than the codes' outline
    (`fat_footprints`) or drifting across an object (`mottled_colours`). It learns first on windows of them
    (`Plan.decoder_crop`, 3x cheaper a step), then (`whole`) on whole pictures: a window's edge looks to the decoder
    like the picture's, and the windows alone left a frame round the picture and a tint on its background."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = make_optimizer([{"params": params}])
    name, steps, crop, lr = (("vae-decoder-whole", plan.decoder_whole_steps, 0, 2e-4) if whole else
                             ("vae-decoder", plan.decoder_steps, plan.decoder_crop, 5e-4))
    draws = 1_000_000 if whole else 0  # the whole pictures' scenes and noise are not the windows' again
    stage = Stage(name, work, {"vae": vae}, opt, steps, lr=lr, warmup=50, minutes=plan.stage_minutes(name))

    def step_fn(step):
        rng = random.Random(seed * 7907 + draws + step)
        x = images_to_tensor([scenes.render(scenes.random_edit_pair(rng).after if rng.random() < 0.4 else
                                            scenes.random_group_scene(rng, held_out=None))
                              for _ in range(plan.decoder_batch)]).to(device)
        with torch.no_grad():
            mean, logvar = vae.encode(x)
            gen = torch.Generator().manual_seed(draws + step)
            eps = torch.randn(mean.shape, generator=gen).to(device)
            z = mean + 0.1 * eps * (0.5 * logvar).exp()
            z = fat_footprints(z, degrade_latents(z, gen), gen, plan.decoder_fat)
            z = mottled_colours(z, gen, plan.decoder_mottle, plan.decoder_mottle_size)
            if crop:
                z, x = crop_pairs(z, x, crop // 8, rng)
        rec = vae.decode(z)
        w = edge_weights(x, plan.decoder_edge)
        loss = (w * ((rec - x).abs() + (rec - x).pow(2))).mean() / w.mean()
        return optimise(opt, loss, params)

    stage.run(step_fn)
    vae.requires_grad_(True)


@torch.no_grad()
def normalise_latents(vae: VAE, device, seed: int, n: int = 256) -> dict:
    """Fold a per-channel affine into the quant convs so (latent - 0.1159) * 0.3611 is ~N(0, 1), as the
    Flux latent format ComfyUI applies to Z-Image expects. Exact: the quant convs are 1x1."""
    rng = random.Random(seed)
    x = images_to_tensor([scenes.render(scenes.random_group_scene(rng, held_out=None)) for _ in range(n)]).to(device)
    mean, _ = vae.encode(x)
    m, s = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3)).clamp_min(1e-3)
    a = 1.0 / (LATENT_SCALE * s)
    b = LATENT_SHIFT - m * a
    z = VAE_CONFIG["z_channels"]
    qw, qb = vae.quant_conv.weight[:, :, 0, 0], vae.quant_conv.bias
    scale = torch.cat([a, torch.ones_like(a)])
    new_qw = qw * scale[:, None]
    new_qb = qb * scale + torch.cat([b, 2 * torch.log(a)])
    new_qw[z:] = qw[z:]
    vae.quant_conv.weight.copy_(new_qw[:, :, None, None])
    vae.quant_conv.bias.copy_(new_qb)
    pw, pb = vae.post_quant_conv.weight[:, :, 0, 0], vae.post_quant_conv.bias
    vae.post_quant_conv.weight.copy_((pw / a[None, :])[:, :, None, None])
    vae.post_quant_conv.bias.copy_(pb - (pw * (b / a)[None, :]).sum(1))
    return {"channel_mean": m.tolist(), "channel_std": s.tolist()}


# ---------------------------------------------------------------------------------------------------
# Stage 2: the data set, rendered once and encoded to latents.

class Captions:
    """Token ids exactly as ComfyUI's Z-Image tokenizer makes them (chat template included)."""

    def __init__(self):
        self.tokenizer = ZImageTokenizer()
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            tokens = self.tokenizer.tokenize_with_weights(text)["qwen3_4b"]
            self.cache[text] = [int(t[0]) for batch in tokens for t in batch]
        return self.cache[text]

    def table(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts' ids as one int32 table, right-padded with the pad token, and their lengths."""
        ids = [self.ids(t) for t in texts]
        table = torch.full((len(ids), max(len(i) for i in ids)), PAD_ID, dtype=torch.int32)
        for k, row in enumerate(ids):
            table[k, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return table, torch.tensor([len(i) for i in ids], dtype=torch.int32)


@torch.no_grad()
def build_dataset(work: Path, plan: Plan, vae: VAE, device, seed: int, compile_encoder: bool = False) -> Path:
    path = work / "data.safetensors"
    if path.exists():
        return path
    started = time.time()
    captions = Captions()
    encode = compiled(vae.encode, compile_encoder)  # encoding is most of this stage
    rng = random.Random(seed)
    log(f"data: rendering and encoding {plan.scenes} scenes and {plan.edit_pairs} edit pairs")

    class Encoded(list):
        """Pictures in, latents out: encoded 64 at a time as they arrive, so the pictures are never all held."""

        def __init__(self):
            super().__init__()
            self.pending = []

        def add(self, image):
            self.pending.append(image)
            if len(self.pending) == 64:
                self.flush()

        def flush(self):
            if self.pending:
                mean, _ = encode(images_to_tensor(self.pending).to(device))
                self.append(mean.half().cpu())
                self.pending = []

        def tensor(self):
            self.flush()
            return torch.cat(self)

    texts_zh, texts_en, latents = [], [], Encoded()
    for _ in range(plan.scenes):
        scene = scenes.random_group_scene(rng, held_out=False)
        latents.add(scenes.render(scene))
        texts_zh.append(scenes.caption(scene, "zh", rng))
        texts_en.append(scenes.caption(scene, "en", rng))
    latents = latents.tensor()
    edit_zh, edit_en, edit_kind, edit_objects, before, after = [], [], [], [], Encoded(), Encoded()
    for _ in range(plan.edit_pairs):
        pair = scenes.random_edit_pair(rng)
        edit_kind.append(scenes.EDIT_KINDS.index(pair.kind))
        edit_objects.append(len(pair.before.items))
        before.add(scenes.render(pair.before))
        after.add(scenes.render(pair.after))
        edit_zh.append(scenes.edit_instruction(pair, "zh", rng))
        edit_en.append(scenes.edit_instruction(pair, "en", rng))
    edit_before, edit_after = before.tensor(), after.tensor()

    tensors = {"latents": latents, "edit_before": edit_before, "edit_after": edit_after,
               "edit_kind": torch.tensor(edit_kind, dtype=torch.uint8),
               "edit_objects": torch.tensor(edit_objects, dtype=torch.uint8)}
    for name, texts in (("zh", texts_zh), ("en", texts_en), ("edit_zh", edit_zh), ("edit_en", edit_en), ("empty", [""])):
        tensors[f"{name}.ids"], tensors[f"{name}.len"] = captions.table(texts)
    examples = {"zh": texts_zh[:5], "en": texts_en[:5], "edit_zh": edit_zh[:5], "edit_en": edit_en[:5]}
    save_file(tensors, str(path), metadata={"examples": json.dumps(examples, ensure_ascii=False),
                                            "state": json.dumps({"seconds": time.time() - started})})
    log(f"data: {len(captions.cache)} distinct captions; latent std {latents.float().std():.3f}")
    return path


def used_token_ids(data: dict) -> list[int]:
    ids = set()
    for key in ("zh.ids", "en.ids", "edit_zh.ids", "edit_en.ids", "empty.ids"):
        ids.update(int(i) for i in torch.unique(data[key]))
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------
# Stages 3-5: rectified flow on latents (base), distillation (turbo), reference-image editing (edit).

def step_generator(seed: int, device) -> torch.Generator:
    """Per-step randomness, drawn on the device that trains (on the CPU the draws are those of earlier runs)."""
    return torch.Generator(device=device).manual_seed(seed)


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps shifted by 3, as Z-Image's sampling is, so training matches where sampling spends
    steps; half the batch instead draws uniformly, because at 16x16 latents the shift leaves the low-noise steps
    that draw an object's edges almost untrained (1.4% of draws below sigma 0.25)."""
    d = gen.device
    u = torch.sigmoid(torch.randn(n, generator=gen, device=d))
    shifted = SAMPLING_SHIFT * u / (1 + (SAMPLING_SHIFT - 1) * u)
    uniform = torch.rand(n, generator=gen, device=d)
    return torch.where(torch.rand(n, generator=gen, device=d) < 0.5, uniform, shifted).clamp(1e-3, 1.0)


def schedule(steps: int) -> torch.Tensor:
    """The sigmas ComfyUI's `simple` scheduler gives with shift 3 (what KSampler uses for these models)."""
    t = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    s = SAMPLING_SHIFT * t / (1 + (SAMPLING_SHIFT - 1) * t)
    return torch.cat([s, torch.zeros(1)])


class Batches:
    """Caption batches whose lengths round up to the same multiple of 32, so per-sample padding equals inference's.
    Gathered with whole-table indexing: a per-sample loop cost a GPU step of batch 512 a third of its time."""

    def __init__(self, data: dict, prefix: str, plan: Plan, p: np.ndarray | None = None):
        self.plan, self.p = plan, p  # p: each sample's probability of being drawn (None: evenly)
        self.n = data[f"{prefix}zh.ids"].shape[0]
        tables = [data[f"{prefix}zh.ids"], data[f"{prefix}en.ids"], data["empty.ids"]]
        width = max(t.shape[1] for t in tables)
        pad = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD_ID) for t in tables]
        self.ids = torch.cat(pad)  # rows: zh captions, en captions, then the empty caption
        self.lens = torch.cat([data[f"{prefix}zh.len"], data[f"{prefix}en.len"], data["empty.len"]]).long()

    def pick(self, step: int, seed: int, batch: int):
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, self.n, size=batch) if self.p is None else rng.choice(self.n, size=batch, p=self.p)
        zh = rng.random(batch) < self.plan.zh_share
        drop = rng.random(batch) < self.plan.drop_caption
        rows = torch.from_numpy(np.where(drop, 2 * self.n, np.where(zh, idx, self.n + idx)))
        lens = self.lens[rows]
        bucket = (lens + 31) // 32
        keep = bucket == bucket[0]
        # every batch of a bucket has the same width (the DiT pads captions to 32 tokens anyway, and the causal encoder
        # leaves the captions' own states alone), so a compiled model sees one shape and never recompiles
        width = min(self.ids.shape[1], 32 * int(bucket[0]))
        return torch.from_numpy(idx)[keep], self.ids[rows[keep], :width].long(), lens[keep]


def flow_loss(dit, te, latents, ids, lens, gen, device, refs=None, te_grad=True, weights=None):
    z0 = (latents.float().to(device) - LATENT_SHIFT) * LATENT_SCALE
    noise = torch.randn(z0.shape, generator=gen, device=gen.device).to(device)
    sigma = sample_sigmas(z0.shape[0], gen).to(device)
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * z0 + s * noise
    with torch.set_grad_enabled(te_grad):
        ctx = encode_text(te, ids.to(device))
    out = dit(xt, sigma, ctx, ctx.shape[1], cap_lengths=lens.to(device), ref_latents=refs)
    err = (out - (noise - z0)).pow(2)
    return (err if weights is None else err * weights).mean()


def channel_weights(device) -> torch.Tensor:
    """The loss weight of each latent channel: the shape codes count CODE_LOSS_WEIGHT times, the colour codes
    COLOUR_CODE_LOSS_WEIGHT times (mean 1)."""
    w = torch.ones(VAE_CONFIG["z_channels"], device=device)
    w[SHAPE_CODES] = CODE_LOSS_WEIGHT
    w[COLOUR_CODES] = COLOUR_CODE_LOSS_WEIGHT
    return (w / w.mean()).view(1, -1, 1, 1)


def train_base(work, plan, data, te, device, seed, compile_dit=False):
    dit = make_dit(seed + 1).to(device)
    model = compiled(dit, compile_dit)
    ema = EMA(dit, plan.ema_base if plan.base_steps > 1000 else 0.9).to(device)
    opt = make_optimizer([{"params": dit.parameters()}, {"params": te.parameters()}])
    stage = Stage("base", work, {"dit": dit, "te": te, "ema": ema}, opt, plan.base_steps, plan.lr, warmup=200,
                  minutes=plan.stage_minutes("base"))
    batches = Batches(data, "", plan)
    weights = channel_weights(device)

    def step_fn(step):
        gen = step_generator(seed * 1_000_003 + step, device)
        idx, ids, lens = batches.pick(step, seed, plan.batch)
        loss = flow_loss(model, te, data["latents"][idx], ids, lens, gen, device, weights=weights)
        return optimise(opt, loss, list(dit.parameters()) + list(te.parameters()))

    state = stage.run(step_fn, ema)
    dit.load_state_dict(ema.state())
    return dit, state


def teacher_velocity(teacher, xt, sigma, ctx, lens, unc, unc_lens, cfg):
    both = teacher(torch.cat([xt, xt]), torch.cat([sigma, sigma]), torch.cat([ctx, unc]), ctx.shape[1],
                   cap_lengths=torch.cat([lens, unc_lens]))
    cond, uncond = both.chunk(2)
    return uncond + cfg * (cond - uncond)


def train_turbo(work, plan, data, te, teacher, device, seed, compile_dit=False):
    """Teacher-student distillation: the student learns, at cfg 1, to cross each interval of the 8-step
    schedule in one step, matching two guided (cfg 4) teacher steps over the same interval."""
    student = make_dit(seed + 2).to(device)
    student.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)
    te.requires_grad_(False)
    ema = EMA(student, 0.99 if plan.turbo_steps > 200 else 0.5).to(device)
    teacher_model, student_model = compiled(teacher, compile_dit), compiled(student, compile_dit)
    opt = make_optimizer([{"params": student.parameters()}])
    stage = Stage("turbo", work, {"dit": student, "ema": ema}, opt, plan.turbo_steps, plan.lr * 0.4, warmup=50,
                  minutes=plan.stage_minutes("turbo"))
    batches = Batches(data, "", replace(plan, drop_caption=0.0))
    sigmas = schedule(plan.turbo_steps_sampler).to(device)
    with torch.no_grad():  # the empty prompt, for the teacher's unconditional half (the encoder is frozen)
        empty = encode_text(te, data["empty.ids"][:1].long().to(device))
    empty_len = data["empty.len"][:1]

    def step_fn(step):
        gen = step_generator(seed * 1_000_033 + step, device)
        idx, ids, lens = batches.pick(step, seed + 1, plan.batch)
        z0 = (data["latents"][idx].float().to(device) - LATENT_SHIFT) * LATENT_SCALE
        noise = torch.randn(z0.shape, generator=gen, device=gen.device).to(device)
        k = torch.randint(0, plan.turbo_steps_sampler, (z0.shape[0],), generator=gen, device=gen.device).to(device)
        s0, s1 = sigmas[k], sigmas[k + 1]
        x = (1 - s0.view(-1, 1, 1, 1)) * z0 + s0.view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            ctx = encode_text(te, ids.to(device))
            unc = empty.expand(ctx.shape[0], -1, -1)
            # the empty prompt, right-padded to the batch's width (cap_lengths turns the padding into pad tokens)
            unc = torch.nn.functional.pad(unc, (0, 0, 0, max(0, ctx.shape[1] - unc.shape[1])))[:, :ctx.shape[1]]
            unc_lens = empty_len.expand(ctx.shape[0]).clone()
            xs, mid = x, (s0 + s1) / 2
            for a, b in ((s0, mid), (mid, s1)):
                v = teacher_velocity(teacher_model, xs, a, ctx, lens.to(device), unc, unc_lens.to(device), plan.teacher_cfg)
                xs = xs + (b - a).view(-1, 1, 1, 1) * v
            target = (xs - x) / (s1 - s0).view(-1, 1, 1, 1)
        out = student_model(x, s0, ctx, ctx.shape[1], cap_lengths=lens.to(device))
        loss = (out - target).pow(2).mean()
        return optimise(opt, loss, student.parameters())

    state = stage.run(step_fn, ema)
    student.load_state_dict(ema.state())
    return student, state


EDIT_CHANGE_THRESHOLD = 1.5  # normalised latent units: the edited object moves its blocks by 2-4, the rest by under 1


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


def edit_sample_weights(data: dict, move_share: float, lone_share: float = 0.0) -> np.ndarray | None:
    """Per edit pair, its probability of being drawn, so that moves make up `move_share` of the samples and pairs of
    one object alone `lone_share` (each 0: as drawn; the two are about independent in the data set); None: evenly."""
    w, applied = np.ones(data["edit_zh.ids"].shape[0]), False
    for key, pick, share in (("edit_kind", lambda v: v == scenes.EDIT_KINDS.index("move"), move_share),
                             ("edit_objects", lambda v: v == 1, lone_share)):
        if share <= 0:
            continue
        if key not in data:
            raise ValueError(f"this data set records no {key} (built by an older recipe): rebuild it, or leave the plan's "
                             "edit shares as drawn")
        chosen = pick(data[key].cpu().numpy())
        if chosen.any() and not chosen.all():
            w *= np.where(chosen, share / chosen.sum(), (1 - share) / (~chosen).sum())
            applied = True
    return w / w.sum() if applied else None


def train_edit(work, plan, data, te, base, device, seed, compile_dit=False):
    """Instruction editing from nano-base: the input image's latent enters as reference tokens."""
    dit = make_dit(seed + 3).to(device)
    dit.load_state_dict(base.state_dict())
    te.requires_grad_(False)
    ema = EMA(dit, 0.995 if plan.edit_steps > 500 else 0.5).to(device)
    model = compiled(dit, compile_dit)
    opt = make_optimizer([{"params": dit.parameters()}])
    stage = Stage("edit", work, {"dit": dit, "ema": ema}, opt, plan.edit_steps, plan.lr * 0.6, warmup=100,
                  minutes=plan.stage_minutes("edit"))
    batches = Batches(data, "edit_", plan, edit_sample_weights(data, plan.edit_move_share, plan.edit_lone_share))
    weights = channel_weights(device)

    def step_fn(step):
        gen = step_generator(seed * 1_000_037 + step, device)
        idx, ids, lens = batches.pick(step, seed + 2, plan.batch)
        before, after = data["edit_before"][idx], data["edit_after"][idx]
        ref = (before.float().to(device) - LATENT_SHIFT) * LATENT_SCALE
        # focus 0: all ones, the plain loss
        focus = weights * edit_region_weights(before, after, plan.edit_focus, plan.edit_focus_objects)
        loss = flow_loss(model, te, after, ids, lens, gen, device, refs=[ref], te_grad=False, weights=focus)
        return optimise(opt, loss, dit.parameters())

    state = stage.run(step_fn, ema)
    dit.load_state_dict(ema.state())
    return dit, state


# ---------------------------------------------------------------------------------------------------
# Export and report.

def fp16(module_or_sd) -> dict:
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in sd.items()}


def text_encoder_tensors(te) -> dict:
    """The big embedding table in fp16; the rest (tiny) in fp32, so ComfyUI runs the encoder in fp32 as trained."""
    return {k: v.detach().to("cpu", torch.float16 if "embed_tokens" in k else torch.float32).contiguous()
            for k, v in te.state_dict().items()}


def export(out: Path, te, vae, dits: dict, report: dict) -> list[Path]:
    written = []
    common = {"zimage.family": "nano", "zimage.trained_by": "python -m nano.train",
              "zimage.report": json.dumps({k: report[k] for k in ("seed", "device", "minutes") if k in report})}
    for folder, name, sd, meta in (
        ("text_encoders", "nano_qwen3.safetensors", text_encoder_tensors(te),
         {"zimage.config": json.dumps(TE_CONFIG)}),
        ("vae", "nano_ae.safetensors", fp16(vae), {"zimage.config": json.dumps(VAE_CONFIG)}),
    ):
        (out / folder).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out / folder / name), metadata={**common, **meta})
        written.append(out / folder / name)
    rope = ("axes_dims", "axes_lens", "rope_theta", "time_scale")
    dit_meta = {"zimage.dit_config": json.dumps({k: DIT_CONFIG[k] for k in rope})}
    for variant, dit in dits.items():
        sd = fp16(dit)
        sd.pop("norm_final.weight", None)  # unused by NextDiT, absent from the released files
        (out / "diffusion_models").mkdir(parents=True, exist_ok=True)
        path = out / "diffusion_models" / f"nano_zimage_{variant}.safetensors"
        layout = {REFERENCE_LAYOUT_KEY: APPENDED_REFERENCES} if variant == "edit" else {}
        save_file(sd, str(path), metadata={**common, **dit_meta, **layout, "zimage.variant": variant})
        written.append(path)
    return written


def plot_losses(path: Path, curves: dict) -> None:
    """Loss curves as a PNG, drawn with PIL (log-scale loss against step, one panel per stage)."""
    from PIL import Image, ImageDraw
    panels = [(k, v) for k, v in curves.items() if v]
    w, h = 360, 240
    img = Image.new("RGB", (w * max(1, len(panels)), h), "white")
    draw = ImageDraw.Draw(img)
    for p, (name, points) in enumerate(panels):
        x0 = p * w
        steps = [s for s, _ in points]
        logs = [math.log10(max(v, 1e-6)) for _, v in points]
        lo, hi = min(logs), max(logs) if max(logs) > min(logs) else min(logs) + 1
        smax = max(steps) or 1
        pts = [(x0 + 40 + (w - 60) * s / smax, h - 30 - (h - 60) * (lv - lo) / (hi - lo))
               for s, lv in zip(steps, logs, strict=True)]
        draw.rectangle([x0 + 40, 30, x0 + w - 20, h - 30], outline=(180, 180, 180))
        if len(pts) > 1:
            draw.line(pts, fill=(200, 40, 40), width=2)
        draw.text((x0 + 45, 8), f"{name}: loss {10 ** hi:.3g} -> {10 ** logs[-1]:.3g} ({smax} steps)", fill="black")
    img.save(path)


def claim_work_folder(work: Path, plan: Plan) -> str | None:
    """Make `work` this plan's (a fresh folder gets a plan.json) and return None, or say why this plan must not use
    it, so a resume never mixes checkpoints of two recipes (sizes, or the latent: older folders hold no record)."""
    record = work / "plan.json"
    if record.exists():
        if json.loads(record.read_text()) == plan.__dict__:
            return None
        return (f"{work} holds checkpoints of another plan ({record}): resume it with the command that made it, "
                "or give this run its own --work")
    if any(work.glob("*.ckpt.safetensors")):
        return (f"{work} holds checkpoints from an older recipe of this script (no plan.json): delete the folder or "
                "give this run its own --work")
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(plan.__dict__, indent=1))
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models", help="where the weights go (models/<kind>/)")
    ap.add_argument("--work", type=Path, default=None,
                    help="checkpoints and data (default .cache/nano-train, -gpu for the GPU plan, -quick for --quick); it "
                         "records its plan, and another plan's run refuses it")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--quick", action="store_true", help="a few steps on a few samples, to prove the pipeline")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="the GPU plan: how long the training stages run together (building the data set and loading "
                         "take about 2 minutes more on an H200)")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile the DiT stages (base, turbo, edit) and the data set's encoding: about 1.45x "
                         "faster on the CPU, after up to a minute of compiling each; auto: on for the CPU plan, off for "
                         "--quick and the GPU plan (not measured there)")
    ap.add_argument("--plan", choices=("auto", "cpu", "gpu"), default="auto",
                    help="sizes and steps: the CPU plan (fixed steps, about 117 min on 2 cores, compiled) or the GPU plan "
                         "(timed by --minutes); auto picks by device")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    use_gpu_plan = args.plan == "gpu" or (args.plan == "auto" and device.type == "cuda")
    if use_gpu_plan and not args.quick and args.minutes <= 0:
        ap.error("--minutes must be above 0: the GPU plan trains each stage for its share of them")
    plan = Plan.quick() if args.quick else Plan.gpu(args.minutes) if use_gpu_plan else Plan()
    # each plan keeps its own work files: a resume must find the data set and schedules of its own plan
    work = "nano-train-quick" if args.quick else "nano-train-gpu" if use_gpu_plan else "nano-train"
    args.work = args.work or REPO_ROOT / ".cache" / work
    refusal = claim_work_folder(args.work, plan)
    if refusal:
        ap.error(refusal)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.time()
    torch.manual_seed(args.seed)
    use_sdpa_attention()

    vae = train_vae(args.work, plan, device, args.seed)
    stats_path = args.work / "vae-stats.json"
    if not stats_path.exists() or not (args.work / "vae-normalised.safetensors").exists():
        stats = normalise_latents(vae, device, args.seed)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(args.work / "vae-normalised.safetensors"))
        stats_path.write_text(json.dumps(stats))
    else:
        vae.load_state_dict(load_file(str(args.work / "vae-normalised.safetensors")))
    finetune_decoder(args.work, plan, vae, device, args.seed)
    finetune_decoder(args.work, plan, vae, device, args.seed, whole=True)
    vae.eval()
    fast = args.compile == "on" or (args.compile == "auto" and not args.quick and not use_gpu_plan)
    data_path = build_dataset(args.work, plan, vae, device, args.seed, compile_encoder=fast)
    data = load_file(str(data_path))
    for key in ("latents", "edit_before", "edit_after"):  # batches are gathered where the model runs
        data[key] = data[key].to(device)
    te = make_text_encoder(args.seed + 5, used_token_ids(data)).to(device)
    base, base_state = train_base(args.work, plan, data, te, device, args.seed, compile_dit=fast)
    turbo, turbo_state = train_turbo(args.work, plan, data, te, base, device, args.seed, compile_dit=fast)
    base.requires_grad_(False)
    edit, edit_state = train_edit(args.work, plan, data, te, base, device, args.seed, compile_dit=fast)

    vae_state = json.loads(file_metadata(args.work / "vae.ckpt.safetensors").get("state", "{}"))
    decoder_state, whole_state = (json.loads(file_metadata(args.work / f"{name}.ckpt.safetensors").get("state", "{}"))
                                  for name in ("vae-decoder", "vae-decoder-whole"))
    minutes = (time.time() - started) / 60
    data_state = json.loads(file_metadata(data_path).get("state", "{}"))
    stages = (("vae", vae_state), ("vae-decoder", decoder_state), ("vae-decoder-whole", whole_state), ("data", data_state),
              ("base", base_state), ("turbo", turbo_state), ("edit", edit_state))
    report = {"seed": args.seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              # the stages' own clocks, which add up across resumes (loading and exporting are not counted)
              "minutes": round(sum(s.get("seconds", 0) for _, s in stages) / 60, 1), "quick": args.quick,
              "plan": plan.__dict__,
              "final_loss": {k: (s["losses"][-1][1] if s.get("losses") else None) for k, s in stages if "losses" in s},
              "stage_minutes": {k: round(s.get("seconds", 0) / 60, 1) for k, s in stages},
              "stage_steps": {k: s.get("step", 0) for k, s in stages if "losses" in s}}
    written = export(args.out, te, vae, {"base": base, "turbo": turbo, "edit": edit}, report)
    report["files"] = {str(p.relative_to(args.out)): p.stat().st_size for p in written}
    report["total_mb"] = round(sum(report["files"].values()) / 2**20, 2)
    (args.out / "training-report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_losses(args.out / "training-loss.png", {k: s["losses"] for k, s in stages if "losses" in s})
    log(f"done in {minutes:.1f} min (the stages took {report['minutes']} min, resumes included); "
        f"{report['total_mb']} MB of weights in {args.out}")
    print(json.dumps(report))
    return 0



if __name__ == "__main__":
    sys.exit(main())
