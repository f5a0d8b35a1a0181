"""The main job: run the bundled turbo workflow on a headless ComfyUI and write its images to a folder.

    python3 install.py run [--output-dir zimage-output] [--prompt TEXT] [--seed N] [--size 128]

Starts ComfyUI on a free 127.0.0.1 port with this plugin, submits workflows/api/zimage-turbo.json (the
shipped nano-turbo model, a Chinese prompt) to /prompt, follows /ws to the end, downloads the images
through /view, stops the server, and prints where the images are.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .comfy_api import ComfyError, PromptRejected
from .runtime import REPO_ROOT
from .server import ComfyServer

DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "zimage-turbo.json"


def nodes_of_type(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node.get("class_type") == class_type]


def set_inputs(prompt: dict, text: str | None, seed: int | None, size: int | None) -> dict:
    """Set prompt text, seed and size on the nodes found by type (ids are not assumed)."""
    if text is not None:
        encoders = [n for n in nodes_of_type(prompt, "CLIPTextEncode") if isinstance(n["inputs"].get("text"), str)]
        encoders[0]["inputs"]["text"] = text
    if seed is not None:
        for node in nodes_of_type(prompt, "KSampler"):
            node["inputs"]["seed"] = seed
    if size is not None:
        for node in nodes_of_type(prompt, "EmptySD3LatentImage"):
            node["inputs"]["width"] = node["inputs"]["height"] = size
    return prompt


def upload_inputs(client, prompt: dict, workflow: Path) -> None:
    """Upload the images LoadImage nodes name when they ship beside the workflow (the edit example)."""
    for node in nodes_of_type(prompt, "LoadImage"):
        for folder in (workflow.parent, workflow.parent.parent):
            path = folder / str(node["inputs"].get("image", ""))
            if path.is_file():
                client.upload_image(path.name, path.read_bytes())
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="zimage-output", help="folder for the images (created)")
    parser.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="API-format workflow to submit")
    parser.add_argument("--prompt", default=None, help="positive prompt (default: the workflow's)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="width and height in pixels")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    prompt = set_inputs(json.loads(Path(args.workflow).read_text()), args.prompt, args.seed, args.size)

    with tempfile.TemporaryDirectory(prefix="zimage-main-job-") as work:
        print("starting ComfyUI (headless, 127.0.0.1) …", flush=True)
        started = time.monotonic()
        try:
            with ComfyServer(Path(work), cpu=not args.gpu) as server:
                print(f"ComfyUI up at {server.url} after {time.monotonic() - started:.0f} s; submitting "
                      f"{Path(args.workflow).name}", flush=True)
                client = server.client()
                upload_inputs(client, prompt, Path(args.workflow))
                result = client.run(prompt, timeout=args.timeout, on_message=_print_progress)
                if result.status != "success":
                    error = result.error or {}
                    print(f"\nthe workflow failed in node {error.get('node_id')} ({error.get('node_type')}): "
                          f"{error.get('exception_message', result.status)}", file=sys.stderr)
                    return 1
                written = []
                for image in result.images():
                    target = output_dir / image["filename"]
                    target.write_bytes(client.view(image))
                    written.append(target)
        except PromptRejected as e:
            print(str(e), file=sys.stderr)
            return 2
        except ComfyError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"\n{len(written)} image(s) written to {output_dir}:")
    for path in written:
        print(f"  {path}")
    return 0 if written else 1


def _print_progress(msg: dict) -> None:
    if msg.get("type") == "progress":
        data = msg["data"]
        value, total = data.get("value", 0), max(data.get("max", 1), 1)
        end = "\n" if value >= total else ""
        print(f"\r  node {data.get('node')}: {100 * value // total:3d}%", end=end, flush=True)


if __name__ == "__main__":
    sys.exit(main())
