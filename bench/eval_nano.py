"""Evaluation of the nano Z-Image family: generated images scored by the deterministic detector.

    .venv/bin/python -m bench.eval_nano [--quick] [--models DIR] [--save DIR]

Loads the shipped weights through the Z-Image Checkpoint Loader and samples with ComfyUI's own sampler code
(`comfy.sample.sample`), as the workflows do:
- 100 held-out scenes (attribute combinations the training never drew), each prompted in Chinese and in
  English: 200 prompts. nano-base at 30 steps, cfg 4, empty negative; nano-turbo at 8 NFE (8 steps of
  res_multistep, counted), cfg 1. Accuracy = attributes right (colour of the named shape, its count, its
  position) / attributes asked, in percent. `zh_en_gap` is the larger of the two models' |zh - en|.
- 100 edits (recolour / move / delete, half Chinese) with nano-edit at 20 steps, cfg 4 (`--edit-cfg`): an edit is right
  when the named attribute changed, every other object is still read in its place with its shape and colour, and
  the mean pixel change outside the edited object is below `detector.EDIT_OUTSIDE_THRESHOLD`.
The last line is the JSON of the figures. `--quick` scores 20 prompts and 10 edits.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from bench import common
from devtools.comfy_runtime import REPO_ROOT

common.start_comfy(cpu=True)  # imported by another benchmark: keeps that one's device

import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from comfy_extras.nodes_edit_model import ReferenceLatent  # noqa: E402
from comfyui_zimage.nodes.loader import ZImageCheckpointLoader  # noqa: E402
from PIL import Image  # noqa: E402

from nano import detector, scenes  # noqa: E402

TEXT_ENCODER, VAE = "nano_qwen3.safetensors", "nano_ae.safetensors"


def register_models(models: Path = REPO_ROOT / "models") -> None:
    for kind in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)


def load(variant: str):
    out = ZImageCheckpointLoader.execute(f"diffusion_models/nano_zimage_{variant}.safetensors", TEXT_ENCODER, VAE,
                                         "default", "default")
    return out.result[:3]


def encode(clip, text: str, reference=None):
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    if reference is not None:  # core's node, as the edit workflow wires it
        cond = ReferenceLatent.execute(cond, {"samples": reference}).result[0]
    return cond


class CountCalls:
    def __init__(self):
        self.calls = 0

    def __call__(self, apply_model, args):
        self.calls += 1
        return apply_model(args["input"], args["timestep"], **args["c"])


def generate(model, clip, vae, text, seed, steps, cfg, negative="", reference=None, latent=None, counter=None):
    if counter is not None:
        model = model.clone()
        model.set_model_unet_function_wrapper(counter)
    if latent is None:
        latent = torch.zeros(1, 16, scenes.SIZE // 8, scenes.SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, "res_multistep", "simple",
                                  encode(clip, text, reference), encode(clip, negative, reference), latent,
                                  seed=seed, disable_pbar=True)
    pixels = vae.decode(samples)[0].clamp(0, 1)
    return Image.fromarray((pixels.numpy() * 255).round().astype(np.uint8))


def accuracy(results: list[dict]) -> float:
    right = sum(sum(r.values()) for r in results)
    asked = sum(len(r) for r in results)
    return 100.0 * right / max(1, asked)


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "20 prompts and 10 edits")
    ap.add_argument("--models", type=Path, default=REPO_ROOT / "models", help="folder with the family's model folders")
    ap.add_argument("--save", type=Path, help="also write every generated image here")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--edit-cfg", type=float, default=4.0, help="nano-edit's guidance scale")
    ap.add_argument("--only", choices=("base", "turbo", "edit"), action="append", help="score only these variants")
    args = ap.parse_args()
    register_models(args.models)
    n_scenes, n_edits = (10, 10) if args.quick else (100, 100)
    rng = random.Random(args.seed)
    prompts = [scenes.random_group_scene(rng, held_out=True) for _ in range(n_scenes)]
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    figures, started = {}, time.time()
    torch.set_grad_enabled(False)

    wanted = set(args.only or ("base", "turbo", "edit"))
    for variant, steps, cfg in (("base", 30, 4.0), ("turbo", 8, 1.0)):
        if variant not in wanted:
            continue
        model, clip, vae = load(variant)
        counter = CountCalls()
        by_lang = {"zh": [], "en": []}
        for i, scene in enumerate(prompts):
            for lang in ("zh", "en"):
                text = scenes.caption(scene, lang)
                before = counter.calls
                image = generate(model, clip, vae, text, args.seed + i, steps, cfg, counter=counter)
                nfe = counter.calls - before
                by_lang[lang].append(detector.score_prompt(scene, image))
                if args.save:
                    image.save(args.save / f"{variant}-{i:03d}-{lang}.png")
        zh, en = accuracy(by_lang["zh"]), accuracy(by_lang["en"])
        figures[f"{variant}_acc"] = round(accuracy(by_lang["zh"] + by_lang["en"]), 1)
        figures[f"{variant}_zh_acc"], figures[f"{variant}_en_acc"] = round(zh, 1), round(en, 1)
        figures[f"{variant}_model_calls"] = nfe  # per image; cond and uncond count once when batched together
        for attr in ("colour", "count", "position"):
            rows = [r[attr] for r in by_lang["zh"] + by_lang["en"] if attr in r]
            figures[f"{variant}_{attr}_acc"] = round(100.0 * sum(rows) / max(1, len(rows)), 1)
        print(f"{variant}: {figures[f'{variant}_acc']}% (zh {zh:.1f}, en {en:.1f}), {nfe} model calls per image", flush=True)
    scored = [v for v in ("base", "turbo") if f"{v}_acc" in figures]
    if scored:
        figures["zh_en_gap"] = round(max(abs(figures[f"{v}_zh_acc"] - figures[f"{v}_en_acc"]) for v in scored), 1)
    if len(scored) == 2:
        figures["turbo_minus_base"] = round(figures["turbo_acc"] - figures["base_acc"], 1)
    if "edit" in wanted:
        score_edits(args, figures, n_edits)
    figures.update(prompts=2 * n_scenes, edits=n_edits, quick=args.quick, seconds=round(time.time() - started, 1),
                   machine=common.machine())
    common.print_figures(figures)
    return 0


def score_edits(args, figures: dict, n_edits: int) -> None:
    model, clip, vae = load("edit")
    erng = random.Random(args.seed + 1)
    edits, outside = [], []
    for i in range(n_edits):
        pair = scenes.random_edit_pair(erng)
        before = scenes.render(pair.before)
        latent = vae.encode(torch.from_numpy(np.asarray(before, dtype=np.float32) / 255.0)[None])
        text = scenes.edit_instruction(pair, "zh" if i % 2 == 0 else "en")
        image = generate(model, clip, vae, text, args.seed + i, 20, args.edit_cfg, reference=latent,
                         latent=torch.zeros_like(latent))
        result = detector.score_edit(pair, before, image)
        edits.append(result["ok"])
        outside.append(result["outside_change"])
        if args.save:
            before.save(args.save / f"edit-{i:03d}-input.png")
            image.save(args.save / f"edit-{i:03d}-output.png")
    figures["edit_acc"] = round(100.0 * sum(edits) / len(edits), 1)
    figures["edit_outside_change_median"] = round(float(np.median(outside)), 4)
    figures["edit_outside_threshold"] = detector.EDIT_OUTSIDE_THRESHOLD
    print(f"edit: {figures['edit_acc']}% of edits right; median change outside the object {np.median(outside):.4f}")


if __name__ == "__main__":
    sys.exit(main())
