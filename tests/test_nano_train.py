"""The training script end to end on a few samples, its resume, and the shipped weights' budget."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfyui_zimage.nodes.checkpoint_format import (
    detect_variant,
    infer_dit_config,
    infer_qwen3_config,
    infer_vae_config,
    read_header,
)
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = REPO_ROOT / "models"


def shapes(path: Path) -> dict:
    return {k: v.shape for k, v in read_header(path).tensors.items()}


def digest(folder: Path) -> dict:
    """File -> hash of its tensors (the metadata holds the run's duration, which differs)."""
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        h = hashlib.sha256()
        for name, tensor in sorted(load_file(str(path)).items()):
            h.update(name.encode() + tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else name.encode())
        out[str(path.relative_to(folder))] = h.hexdigest()
    return out


def train(out: Path, work: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "nano.train", "--quick", "--out", str(out), "--work", str(work)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_quick_training_writes_a_loadable_family_and_resumes(tmp_path):
    out, work = tmp_path / "models", tmp_path / "work"
    log = train(out, work)
    report = json.loads(log.strip().splitlines()[-1])
    assert report["quick"] and set(report["final_loss"]) == {"vae", "vae-decoder", "base", "turbo", "edit"}
    assert (out / "training-loss.png").stat().st_size > 0 and (out / "training-report.json").exists()
    for variant in ("base", "turbo", "edit"):
        path = out / "diffusion_models" / f"nano_zimage_{variant}.safetensors"
        header = read_header(path)
        config = infer_dit_config(shapes(path), path.name, header.metadata)
        assert config["dim"] == 256 and config["axes_dims"] == [16, 24, 24]
        assert detect_variant(path.name, header.metadata)[0] == variant
    te = out / "text_encoders" / "nano_qwen3.safetensors"
    assert infer_qwen3_config(shapes(te), te.name)["hidden_size"] == 32
    assert infer_vae_config(shapes(out / "vae" / "nano_ae.safetensors"), "vae")["z_channels"] == 16
    first = digest(out)
    # A second run finds every stage finished in its checkpoints, resumes, and re-exports the same weights.
    again = train(out, work)
    assert "resuming at step 3/3" in again
    assert digest(out) == first


@pytest.mark.skipif(not (SHIPPED / "diffusion_models").is_dir(), reason="the trained nano family is not in models/")
def test_shipped_family_fits_the_budget_and_keeps_unused_rows_zero():
    files = sorted(SHIPPED.rglob("*.safetensors"))
    assert {p.name for p in files} >= {"nano_zimage_base.safetensors", "nano_zimage_turbo.safetensors",
                                       "nano_zimage_edit.safetensors", "nano_qwen3.safetensors", "nano_ae.safetensors"}
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    table = load_file(str(SHIPPED / "text_encoders" / "nano_qwen3.safetensors"))["model.embed_tokens.weight"]
    used = (table != 0).any(dim=1)
    assert 100 < int(used.sum()) < 5000 and not bool(used[151669:].any())
    assert table.dtype == torch.float16
