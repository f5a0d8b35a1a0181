"""Submit an API-format workflow to a running ComfyUI, follow it, and download its images.

    python -m zimage_client submit WORKFLOW.json --server http://127.0.0.1:8188 [--prompt TEXT] [--negative TEXT]
        [--seed N] [--size PX | --width PX --height PX] [--steps N] [--model FILE] [--text-encoder FILE] [--vae FILE]
        [--out DIR] [--prompts-file FILE --concurrency N] [--timeout S]

Nodes are found by type and by wiring, never by id: the positive and negative text are the encoders wired
to the sampler's `positive` and `negative` inputs (core CLIPTextEncode or Z-Image Chinese Text Encode).
With --prompts-file (one prompt a line, Chinese welcome), every line is one run, at most --concurrency in
flight; a run whose images are already in --out is skipped, so an interrupted batch resumes where it
stopped, and a summary table ends the batch. A k_gen report in the workflow is printed after its run.

Exit codes: 0 done; 2 the server rejected the workflow (its node errors are printed); 3 the server cannot
be reached; 4 a run was interrupted; 5 a run timed out; 1 a run failed while executing.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .comfy_api import ComfyClient, PromptRejected, RunTimeout, ServerUnreachable

TEXT_ENCODERS = ("CLIPTextEncode", "ZImageChineseTextEncode")
SAMPLERS = ("KSampler", "KSamplerAdvanced")
LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")
EXIT_REJECTED, EXIT_UNREACHABLE, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_FAILED = 2, 3, 4, 5, 1


class WorkflowError(ValueError):
    """A workflow the flags cannot be applied to."""


# ---------------------------------------------------------------------------------------------------
# Setting inputs on an API-format workflow.

def of_type(prompt: dict, types) -> list[tuple[str, dict]]:
    return [(node_id, node) for node_id, node in prompt.items() if node.get("class_type") in types]


def wired(prompt: dict, node: dict, input_name: str) -> dict | None:
    """The node an input is linked to (API format: [node_id, output_index])."""
    link = node["inputs"].get(input_name)
    return prompt.get(str(link[0])) if isinstance(link, list) and len(link) == 2 else None


def apply_options(prompt: dict, *, text=None, negative=None, seed=None, width=None, height=None, steps=None,
                  model=None, text_encoder=None, vae=None) -> dict:
    """A copy of the workflow with the given values set on the nodes found by type and wiring."""
    prompt = copy.deepcopy(prompt)
    samplers = of_type(prompt, SAMPLERS)
    if not samplers and any(v is not None for v in (text, negative, seed, steps)):
        raise WorkflowError("The workflow has no KSampler, so --prompt, --negative, --seed and --steps have nowhere to go.")
    for role, value in (("positive", text), ("negative", negative)):
        if value is None:
            continue
        encoders = [e for _, s in samplers if (e := wired(prompt, s, role)) is not None and e.get("class_type") in TEXT_ENCODERS]
        if not encoders:
            raise WorkflowError(f"No text encoder ({' or '.join(TEXT_ENCODERS)}) is wired to the sampler's {role} input.")
        for encoder in encoders:
            encoder["inputs"]["text"] = value
    for _, sampler in samplers:
        if seed is not None:
            sampler["inputs"]["noise_seed" if sampler["class_type"] == "KSamplerAdvanced" else "seed"] = seed
        if steps is not None:
            sampler["inputs"]["steps"] = steps
    if width is not None or height is not None:
        latents = of_type(prompt, LATENTS)
        if not latents:
            raise WorkflowError("The workflow has no empty-latent node, so --size has nowhere to go.")
        for _, node in latents:
            node["inputs"]["width"] = width or node["inputs"]["width"]
            node["inputs"]["height"] = height or node["inputs"]["height"]
    files = {"model": model, "text_encoder": text_encoder, "vae": vae}
    if any(files.values()):
        loaders = of_type(prompt, ("ZImageCheckpointLoader",))
        if not loaders:
            raise WorkflowError("The workflow has no Z-Image Checkpoint Loader, so --model, --text-encoder and --vae have "
                                "nowhere to go.")
        for _, loader in loaders:
            loader["inputs"].update({k: v for k, v in files.items() if v})
    return prompt


def upload_inputs(client: ComfyClient, prompt: dict, workflow: Path) -> None:
    """Upload the images LoadImage nodes name when they ship beside the workflow (the edit example)."""
    for _, node in of_type(prompt, ("LoadImage",)):
        for folder in (workflow.parent, workflow.parent.parent):
            path = folder / str(node["inputs"].get("image", ""))
            if path.is_file():
                client.upload_image(path.name, path.read_bytes())
                break


# ---------------------------------------------------------------------------------------------------
# Running.

@dataclass
class Outcome:
    text: str
    status: str  # done, skipped, rejected, failed, interrupted, timeout, unreachable
    images: list[Path] = field(default_factory=list)  # saved images, previews and the k_gen plot, as downloaded
    seconds: float = 0.0
    message: str = ""
    k_gen: dict | None = None


def run_key(prompt: dict) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def run_one(client: ComfyClient, prompt: dict, out: Path, text: str, timeout: float, progress) -> Outcome:
    key = run_key(prompt)
    done = sorted(out.glob(f"{key}_*"))
    if done:
        return Outcome(text, "skipped", done, message="already in the output folder")
    started = time.monotonic()
    try:
        result = client.run(prompt, timeout=timeout, on_message=progress)
    except PromptRejected as e:
        return Outcome(text, "rejected", message=str(e))
    except RunTimeout as e:
        return Outcome(text, "timeout", message=str(e))
    except ServerUnreachable as e:
        return Outcome(text, "unreachable", message=str(e))
    seconds = time.monotonic() - started
    if result.status == "interrupted":
        return Outcome(text, "interrupted", seconds=seconds, message="the run was interrupted on the server")
    if result.status != "success":
        error = result.error or {}
        where = f"node {error.get('node_id')} ({error.get('node_type')})"
        return Outcome(text, "failed", seconds=seconds, message=f"{where}: {error.get('exception_message', '')}".strip())
    images = []
    for image in result.images(("output", "temp")):  # saved images, previews and the k_gen plot
        target = out / f"{key}_{image['filename']}"
        target.write_bytes(client.view(image))
        images.append(target)
    return Outcome(text, "done", images, seconds, k_gen=k_gen_of(result.outputs))


def k_gen_of(outputs: dict) -> dict | None:
    for node_output in outputs.values():
        for text in node_output.get("json", []):
            try:
                report = json.loads(text)
            except (TypeError, ValueError):
                continue
            if isinstance(report, dict) and "k_gen" in report:
                return report
    return None


def k_gen_line(report: dict) -> str:
    return f"k_gen {report['k_gen']} s⁻¹ ({report['nfe']} NFE in {report['seconds']} s)"


class Progress:
    """One progress line per run on the terminal (a bar for the node that reports progress)."""

    def __init__(self, quiet: bool):
        self.quiet, self.lock = quiet, threading.Lock()

    def for_run(self, label: str):
        def show(msg: dict):
            if self.quiet or msg.get("type") != "progress":
                return
            data = msg["data"]
            value, total = data.get("value", 0), max(data.get("max", 1), 1)
            filled = 24 * value // total
            with self.lock:
                print(f"\r{label[:30]:30} [{'#' * filled}{'.' * (24 - filled)}] {value}/{total}", end="",
                      flush=True, file=sys.stderr)
                if value >= total:
                    print(file=sys.stderr)
        return show


def exit_code(outcomes: list[Outcome]) -> int:
    order = [("rejected", EXIT_REJECTED), ("unreachable", EXIT_UNREACHABLE), ("interrupted", EXIT_INTERRUPTED),
             ("timeout", EXIT_TIMEOUT), ("failed", EXIT_FAILED)]
    statuses = {o.status for o in outcomes}
    return next((code for status, code in order if status in statuses), 0)


def summary(outcomes: list[Outcome]) -> str:
    rows = ["| # | prompt | status | files | seconds | k_gen |", "| --- | --- | --- | --- | --- | --- |"]
    for i, o in enumerate(outcomes, 1):
        k = f"{o.k_gen['k_gen']:.3f}" if o.k_gen and o.k_gen.get("k_gen") is not None else ""
        rows.append(f"| {i} | {o.text[:40]} | {o.status} | {len(o.images)} | {o.seconds:.1f} | {k} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_client submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", type=Path, help="an API-format workflow (for example workflows/api/zimage-turbo.json)")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="the ComfyUI server's address")
    ap.add_argument("--prompt", help="positive prompt")
    ap.add_argument("--negative", help="negative prompt")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--size", type=int, help="width and height in pixels")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--model", help="diffusion model for the Z-Image Checkpoint Loader")
    ap.add_argument("--text-encoder")
    ap.add_argument("--vae")
    ap.add_argument("--out", type=Path, default=Path("zimage-output"), help="folder for the images (created)")
    ap.add_argument("--prompts-file", type=Path, help="one prompt a line: one run each (resumable)")
    ap.add_argument("--concurrency", type=int, default=2, help="runs in flight at once in batch mode")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: cannot read the workflow {args.workflow}: {e}", file=sys.stderr)
        return EXIT_REJECTED
    if args.prompts_file:
        texts = [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = [args.prompt]
    width, height = args.width or args.size, args.height or args.size
    try:
        prompts = [apply_options(workflow, text=t, negative=args.negative, seed=args.seed, width=width, height=height,
                                 steps=args.steps, model=args.model, text_encoder=args.text_encoder, vae=args.vae)
                   for t in texts]
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    client = ComfyClient(args.server)
    try:
        client.system_stats()
    except ServerUnreachable as e:
        print(f"error: the ComfyUI server at {args.server} cannot be reached ({e}). Start ComfyUI, or give --server.",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    args.out.mkdir(parents=True, exist_ok=True)
    upload_inputs(client, workflow, args.workflow)
    progress = Progress(args.quiet)
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        futures = [pool.submit(run_one, ComfyClient(args.server), p, args.out, t or "(workflow's prompt)", args.timeout,
                               progress.for_run(t or "run")) for p, t in zip(prompts, texts, strict=True)]
        outcomes = [f.result() for f in futures]
    for o in outcomes:
        if o.status in ("done", "skipped"):
            for path in o.images:
                print(path)
        else:
            print(f"{o.status}: {o.text}: {o.message}", file=sys.stderr)
        if o.k_gen:
            print(f"{k_gen_line(o.k_gen)} for {o.text}")
    if len(outcomes) > 1:
        print(summary(outcomes))
    return exit_code(outcomes)


if __name__ == "__main__":
    sys.exit(main())
