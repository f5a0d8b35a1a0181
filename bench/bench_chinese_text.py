"""Chinese text encode benchmark: core CLIPTextEncode and ours on the same texts and encoder, in one process.

    .venv/bin/python -m bench.bench_chinese_text [--quick] [--cpu]

Encoder: the shipped nano Qwen3 (through the Z-Image loader). It encodes in about a millisecond, so the node's
own work (parsing, normalising, statistics) weighs more here than with the 4B encoder, where the same fixed
cost is lost in seconds of encoding. Texts: plain Chinese, English and mixed prompts and the same with
weighted spans. Runs alternate, `time_ratio_vs_core` is the ratio of median
times (plain texts: the figure of the bar; weighted texts reported beside). Also: the effect of a weight on
nano-turbo's pictures (mean absolute pixel change and the detector's reading). Last line: JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from bench import common

common.start_comfy()

import comfy.sample  # noqa: E402
import nodes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from comfyui_zimage.nodes import chinese_text as ct  # noqa: E402

from bench import eval_nano  # noqa: E402
from nano import detector  # noqa: E402

PLAIN = ["蓝色背景上的红色圆形", "一位穿着明制汉服的少女站在江南古镇的石桥上，细雨蒙蒙，水墨风格",
         "a red circle on a blue background", "赛博朋克城市夜景, neon lights, 4k, ultra detailed",
         "招牌上写着“早安中国”，清晨的街道，阳光"]
WEIGHTED = ["蓝色背景上的(红色:1.3)圆形", "一位穿着（明制汉服：1.4）的少女站在江南古镇的石桥上，((细雨蒙蒙))，水墨风格",
            "a (red circle:1.2) on a blue background", "(赛博朋克:1.3)城市夜景, (neon lights:0.8), 4k",
            "(招牌:1.2)上写着“早安中国”，清晨的街道，阳光"]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def compare(clip, texts: list[str], repeats: int) -> dict:
    core_node, ours_node = nodes.CLIPTextEncode(), ct.ZImageChineseTextEncode
    for text in texts:  # warm-up and a check that plain texts agree
        core_node.encode(clip, text)
        ours_node.execute(clip, text)
    core_times, ours_times = [], []
    for _ in range(repeats):
        for text in texts:
            core_times += timed(lambda t=text: core_node.encode(clip, t), 1)
            ours_times += timed(lambda t=text: ours_node.execute(clip, t), 1)
    return {"core_median_ms": round(1000 * statistics.median(core_times), 3),
            "ours_median_ms": round(1000 * statistics.median(ours_times), 3),
            "time_ratio_vs_core": round(statistics.median(ours_times) / statistics.median(core_times), 4)}


def weight_effect(model, clip, vae, seeds: int) -> dict:
    """nano-turbo on 蓝色背景上的(红色:w)圆形 for several w, same seeds: the mean absolute pixel change against
    w = 1 and the red objects the detector finds."""
    uncond, _ = ct.encode(clip, "")
    rows = {}
    baseline = None
    for weight in (1.0, 0.0, 0.5, 1.5, 2.5):
        cond, _ = ct.encode(clip, f"蓝色背景上的(红色:{weight})圆形")
        images = []
        for seed in range(seeds):
            latent = torch.zeros(1, 16, 16, 16)
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = comfy.sample.sample(model, noise, 8, 1.0, "res_multistep", "simple", cond, uncond, latent, seed=seed,
                                          disable_pbar=True)
            images.append((vae.decode(samples)[0].clamp(0, 1).numpy() * 255).astype(np.float32))
        baseline = images if baseline is None else baseline
        change = statistics.mean(float(np.abs(a - b).mean()) for a, b in zip(images, baseline, strict=True))
        red = sum(sum(o.colour == "red" for o in detector.read(img.astype(np.uint8)).objects) for img in images)
        rows[str(weight)] = {"mean_abs_change_255": round(change, 2), "red_objects": red}
    return {"seeds": seeds, "prompt": "蓝色背景上的(红色:w)圆形", "by_weight": rows}


def main() -> int:
    ap = common.parser(__doc__.splitlines()[0], "fewer repeats and seeds")
    common.add_cpu_option(ap)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    eval_nano.register_models()
    started = time.time()
    model, nano_clip, vae = eval_nano.load("turbo")
    repeats = 20 if args.quick else 60
    rows = [{"encoder": "nano qwen3", "texts": "plain", **compare(nano_clip, PLAIN, repeats)},
            {"encoder": "nano qwen3", "texts": "weighted", **compare(nano_clip, WEIGHTED, repeats)}]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False), flush=True)
    effect = weight_effect(model, nano_clip, vae, 4 if args.quick else 16)
    print(json.dumps(effect, ensure_ascii=False), flush=True)
    plain_rows = [r for r in rows if r["texts"] == "plain"]
    figures = {"quick": args.quick, "rows": rows, "weight_effect": effect,
               "time_ratio_vs_core": max(r["time_ratio_vs_core"] for r in plain_rows),
               "device": common.device_name(), "machine": common.machine(),
               "seconds": round(time.time() - started, 1)}
    common.print_figures(figures, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
