"""What a run leaves in models/: the shipped weights (fp16 safetensors with `zimage.*` metadata, so the loader
knows the family and its configs), the training report and its loss curves.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from devtools.comfy_runtime import import_comfy, import_plugin

import_comfy()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from .models import DIT_CONFIG, TE_CONFIG, VAE_CONFIG  # noqa: E402
from .plan import Plan  # noqa: E402

import_plugin()
from comfyui_zimage.nodes.checkpoint_format import APPENDED_REFERENCES, REFERENCE_LAYOUT_KEY  # noqa: E402


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


def training_report(seed: int, device: torch.device, quick: bool, plan: Plan, stages: dict) -> dict:
    """The run in brief, from each stage's state (name -> state; the data set's has only its seconds)."""
    return {"seed": seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            # the stages' own clocks, which add up across resumes (loading and exporting are not counted)
            "minutes": round(sum(s.get("seconds", 0) for s in stages.values()) / 60, 1), "quick": quick,
            "plan": plan.__dict__,
            "final_loss": {k: (s["losses"][-1][1] if s.get("losses") else None) for k, s in stages.items() if "losses" in s},
            "stage_minutes": {k: round(s.get("seconds", 0) / 60, 1) for k, s in stages.items()},
            "stage_steps": {k: s.get("step", 0) for k, s in stages.items() if "losses" in s}}
