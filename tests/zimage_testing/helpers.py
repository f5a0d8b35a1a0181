"""What the tests share beyond fixtures: the repository's paths, the bundled workflows, a sampling graph.
Plain functions with no ComfyUI or torch import, so every kind of test can use them."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
# The bundled workflows and their labels in the canvas's Z-Image menu, as web/workflows.js lists them.
WORKFLOW_MENU = dict(re.findall(r'\["(zimage-[a-z-]+)", "([^"]+)"\]',
                                (REPO_ROOT / "web" / "workflows.js").read_text(encoding="utf-8")))


def workflow_names() -> list[str]:
    """The bundled workflows, by file name without .json."""
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def ui_workflow(name: str) -> dict:
    """A bundled workflow as the canvas saves it."""
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def api_workflow(name: str) -> dict:
    """A bundled workflow's API twin, as /prompt takes it."""
    return json.loads((WORKFLOWS_DIR / "api" / f"{name}.json").read_text(encoding="utf-8"))


def model_variant(model: str) -> str:
    """The loader's variant of a bundled model (nano_zimage_turbo... is turbo)."""
    return re.search(r"zimage_(turbo|base|edit)", model).group(1)


def planned_steps(prompt: dict, sampler: dict, settings: dict) -> int:
    """The steps a KSampler of an API workflow runs: wired from the loader (its variant's figure in `settings`,
    the loader's SAMPLING_SETTINGS), or its own."""
    steps = sampler["inputs"]["steps"]
    return settings[model_variant(prompt[steps[0]]["inputs"]["model"])]["steps"] if isinstance(steps, list) else steps


def unpickled_canary(models_dir: Path) -> Path:
    """The file the pickle among the bad inputs creates if anything ever unpickles it."""
    return Path(models_dir).parent / "UNPICKLED-CANARY"


def sampling_graph(model: str, text: str = "a red circle on a blue background", size: int = 64, steps: int = 2,
                   seed: int = 0, text_encoder: str = "auto", vae: str = "auto", weight_dtype: str = "default",
                   prefix: str = "test") -> dict:
    """Loader -> core ModelSamplingAuraFlow, CLIPTextEncode, KSampler, VAEDecode, SaveImage (API format)."""
    return copy.deepcopy({
        "1": {"class_type": "ZImageCheckpointLoader",
              "inputs": {"model": model, "text_encoder": text_encoder, "vae": vae, "weight_dtype": weight_dtype,
                         "compute_dtype": "default"}},
        "2": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": ["1", 5]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0],
                         "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    })

