"""The main job: run the bundled turbo workflow on a headless ComfyUI and write its images to a folder.

    python3 install.py run [--output-dir zimage-output] [--prompt TEXT] [--seed N] [--size 128]

Starts ComfyUI on a free 127.0.0.1 port with this plugin, submits workflows/api/zimage-turbo.json (the
shipped nano-turbo model, a Chinese prompt) to /prompt, follows /ws to the end, downloads the images
through /view, stops the server, and prints where the images are.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .comfy_api import ComfyError
from .runtime import REPO_ROOT
from .server import ComfyServer
from .submit import (
    Progress,
    WorkflowError,
    apply_options,
    describe,
    existing_files,
    exit_code,
    file_prefix,
    k_gen_line,
    load_workflow,
    run_key,
    run_one,
    upload_inputs,
)

DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "zimage-turbo.json"


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
    try:
        workflow = load_workflow(Path(args.workflow))
        prompt = apply_options(workflow, text=args.prompt, seed=args.seed, width=args.size, height=args.size)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    done = existing_files(output_dir, run_key(prompt))
    if done:  # the same workflow and settings ran before: no need to start ComfyUI
        print(f"{len(done)} file(s) from an earlier run with the same settings are in {output_dir}:")
        for path in done:
            print(f"  {path}")
        return 0

    with tempfile.TemporaryDirectory(prefix="zimage-main-job-") as work:
        print("starting ComfyUI (headless, 127.0.0.1) …", flush=True)
        started = time.monotonic()
        try:
            with ComfyServer(Path(work), cpu=not args.gpu) as server:
                print(f"ComfyUI up at {server.url} after {time.monotonic() - started:.0f} s; submitting "
                      f"{Path(args.workflow).name}", flush=True)
                client = server.client()
                upload_inputs(client, prompt, Path(args.workflow))
                progress = Progress(quiet=False, stream=sys.stdout)
                label = Path(args.workflow).stem
                outcome = run_one(client, prompt, output_dir, args.prompt or "", args.timeout,
                                  progress.for_run(label, prompt), prefix=file_prefix(1, 1, describe(prompt)["prompt"]))
                progress.finish(label, outcome)
        except ComfyError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if outcome.status not in ("done", "skipped"):
        print(f"\nthe workflow did not finish ({outcome.status}): {outcome.message}", file=sys.stderr)
        return exit_code([outcome])  # the client's codes: 2 rejected, 4 interrupted, 5 timed out, 1 failed
    print(f"\n{len(outcome.images)} file(s) written to {output_dir}:")
    for path in outcome.images:
        print(f"  {path}")
    if outcome.k_gen:
        print(k_gen_line(outcome.k_gen) + " (the plot is the wider image)")
    return 0 if outcome.images else 1


if __name__ == "__main__":
    sys.exit(main())
