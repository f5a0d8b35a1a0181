"""The machinery every stage shares: a resumable, seeded training loop (`Stage`) with its learning-rate schedule and
time budget, checkpoints (tensors in safetensors, everything else in JSON: no pickle anywhere), the EMA, the
optimiser, torch.compile, and the work folder's record of its plan.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from devtools.comfy_runtime import import_comfy, import_plugin

import_comfy()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from .plan import Plan  # noqa: E402

import_plugin()
from comfyui_zimage.nodes.compat import training_mode  # noqa: E402


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)



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
        run would still hold much of the random initial weights in what it exports."""
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
    # fused: one kernel for all parameters, where the plain loop's per-tensor ops were most of a CPU step
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8, fused=True)


def compiled(fn, enabled: bool):
    """`fn` (a module or a method) under torch.compile when `enabled`; parameters, state dict and EMA stay the
    module's own. On 2 CPU cores the DiT's norms, modulation and RoPE are many small memory-bound ops: fused, its
    training steps are faster, and so is the VAE's encoding (bench/bench_train_speed.py measures both). Batches keep one
    shape, so each use compiles once; where compiling fails (no C++ compiler) dynamo runs `fn` eagerly instead."""
    if not enabled:
        return fn
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    # base, the teacher and student of turbo, and edit each add entries for the same forward code
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    return torch.compile(fn, dynamic=False)


def step_generator(seed: int, device) -> torch.Generator:
    """Per-step randomness, drawn on the device that trains (on the CPU the draws are those of earlier runs)."""
    return torch.Generator(device=device).manual_seed(seed)


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


