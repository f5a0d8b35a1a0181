"""Hostile and broken model files for the bad-input suite (tests/server/test_bad_inputs_server.py), written into a
ComfyUI models folder beside the good fixtures of checkpoints.py.

Every file is small; what makes it bad is a header that lies (counts, shapes, offsets), a pickle under a
.safetensors name, non-finite weights or broken metadata.

    PYTHONPATH=tests python -m zimage_testing DIR                       # these files and the good ones, into DIR
    PYTHONPATH=tests python -m zimage_testing.bad_inputs table A.json B.json  # docs/bad-inputs.md's table from the
                                                                              # suite's outcome files
"""
from __future__ import annotations

import json
import pickle
import struct
import sys
from pathlib import Path

import torch

from zimage_testing.checkpoints import (
    cast,
    dit_to_diffusers,
    save,
    tiny_dit,
    tiny_qwen3,
    tiny_vae,
    vae_to_diffusers,
    write_sharded,
)


class TouchOnUnpickle:
    """Unpickling this creates the canary file: the suite asserts the canary never appears."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (self.canary,))


def raw_safetensors(path: Path, header: dict, data: bytes = b"", header_length: int | None = None) -> Path:
    """A file whose header says whatever the caller wants (safetensors' own writer would refuse to lie)."""
    body = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(body) if header_length is None else header_length) + body + data)
    return path


def with_nan(sd: dict, key: str) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[0] = float("nan")
    return sd


def write_bad_inputs(out: Path, canary: Path) -> dict[str, Path]:
    """Write every hostile file under `out` (a models folder). Returns {case: path}."""
    out = Path(out)
    dit, te, vae = cast(tiny_dit(), torch.bfloat16), cast(tiny_qwen3(), torch.bfloat16), tiny_vae()
    empty = torch.zeros(0)
    files = {
        # One zero-size tensor with a huge block number: a loader that counts blocks from names builds 10⁸ layers.
        "inflated-dit": save(out / "diffusion_models/attack-inflated-layers.safetensors",
                             {**dit, "layers.99999999.attention.qkv.weight": empty}),
        "inflated-text-encoder": save(out / "text_encoders/attack-inflated-qwen3.safetensors",
                                      {**te, "model.layers.99999999.self_attn.q_proj.weight": empty}),
        "inflated-vae": save(out / "vae/attack-inflated-vae.safetensors",
                             {**vae, "encoder.down.0.block.999999.conv1.weight": empty}),
        "bad-metadata": save(out / "diffusion_models/broken-metadata.safetensors", dit,
                             {"zimage.dit_config": "{not json"}),
        "nan-dit": save(out / "diffusion_models/broken-nan-zimage-turbo.safetensors",
                        with_nan(dit, "final_layer.linear.weight")),
        "nan-text-encoder": save(out / "text_encoders/broken-nan-qwen3.safetensors",
                                 with_nan(te, "model.layers.0.mlp.down_proj.weight")),
        "nan-vae": save(out / "vae/broken-nan-ae.safetensors", with_nan(vae, "decoder.conv_out.weight")),
        "huge-header": raw_safetensors(out / "diffusion_models/attack-huge-header.safetensors", {},
                                       header_length=10**15),
        "shape-beyond-data": raw_safetensors(
            out / "diffusion_models/attack-shape-beyond-data.safetensors",
            {"x_embedder.weight": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 16]}},
            bytes(16)),
        "overlapping-tensors": raw_safetensors(
            out / "diffusion_models/attack-overlapping.safetensors",
            {"x_embedder.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
             "x_embedder.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
    }
    pickled = out / "diffusion_models/attack-pickle.safetensors"
    pickled.write_bytes(pickle.dumps({"x_embedder.weight": TouchOnUnpickle(canary)}))
    files["pickle-named-safetensors"] = pickled

    # A diffusers folder whose shard index sends the loader to a file outside the folder.
    folder = out / "diffusers/attack-index-outside"
    write_sharded(folder / "transformer", "diffusion_pytorch_model", dit_to_diffusers(dit), shards=2)
    save(folder / "text_encoder/model.safetensors", te)
    save(folder / "vae/diffusion_pytorch_model.safetensors", vae_to_diffusers(vae))
    index = next((folder / "transformer").glob("*.index.json"))
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../../tiny-zimage-turbo-diffusers/transformer/" + data["weight_map"][first]
    index.write_text(json.dumps(data))
    files["index-outside"] = folder
    return files


def outcome_table(runs: list[dict]) -> str:
    """Markdown: the counts per outcome for each ComfyUI run, then every case with its outcome and time."""
    versions = [run["comfyui"] for run in runs]
    outcomes = sorted({case["outcome"] for run in runs for case in run["cases"] if "outcome" in case})
    lines = ["| outcome | " + " | ".join(f"ComfyUI {v}" for v in versions) + " |",
             "|---|" + "---:|" * len(versions)]
    for outcome in outcomes + ["failed"]:
        counts = [sum(1 for case in run["cases"] if case.get("outcome", "failed") == outcome) for run in runs]
        lines.append(f"| {outcome} | " + " | ".join(map(str, counts)) + " |")
    lines += ["", "| case | kind | " + " | ".join(f"{v}: outcome (s)" for v in versions) + " |",
              "|---|---|" + "---|" * len(versions)]
    by_case = [{case["case"]: case for case in run["cases"]} for run in runs]
    for case in runs[0]["cases"]:
        cells = []
        for cases in by_case:
            found = cases.get(case["case"])
            cells.append("—" if found is None else f"{found.get('outcome', 'failed')} ({found['seconds']})")
        lines.append(f"| {case['case']} | {case['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    command, *paths = sys.argv[1:] or [""]
    if command != "table" or not paths:
        sys.exit("usage: PYTHONPATH=tests python -m zimage_testing.bad_inputs table OUTCOMES.json [...]")
    print(outcome_table([json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]))
