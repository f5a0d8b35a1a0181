"""Submit an API-format workflow to a running ComfyUI, follow it, and download its images.

    python -m zimage_client submit WORKFLOW.json --server http://127.0.0.1:8188 [--prompt TEXT] [--negative TEXT]
        [--group NAME] [--seed N] [--size PX | --width PX --height PX] [--steps N] [--model FILE]
        [--text-encoder FILE] [--vae FILE] [--out DIR] [--prompts-file FILE [--concurrency N]] [--timeout S]

WORKFLOW is the API format (the canvas's "Export (API)"; workflows/api/ holds the bundled ones). Nodes are
found by type and by wiring, never by id: --prompt and --negative set the text encoders (core CLIPTextEncode or
Z-Image Chinese Text Encode) whose conditioning reaches the sampler's positive and negative inputs, directly or
through conditioning nodes (ReferenceLatent, ConditioningSetArea, ...). A negative made by ConditioningZeroOut
has no text to set.

Groups: in a workflow with several independent parts (zimage-edit: instruction editing and inpainting), each
node's title starts with its group ("Edit: KSampler", "Inpaint: KSampler"). --prompt, --negative, --seed and
--steps go to one group's sampler(s): the one --group names, else the first group in the file (a note on
stderr names it and the others).

With --prompts-file (one prompt a line, Chinese welcome) every line is one run. --concurrency N keeps up to N
prompts queued on the server; one ComfyUI server still runs one prompt at a time, so N > 1 only saves the gap
between runs. Files are named <run>_<prompt slug>_<key>_<name the server gave>, the key being a hash of the
submitted workflow: a run whose files are already in --out is skipped, so a stopped batch resumes where it
stopped. --out also gets manifest.jsonl, one record per run (prompt, negative, seed, group, workflow, files,
status, queue and run seconds, k_gen figures), updated by reruns. A summary table ends a batch; it shows the
time each run waited in the server's queue apart from the time it ran. A k_gen report in the workflow is
printed after its run.

Ctrl-C stops a batch: nothing more is queued, the prompts this client queued are deleted from the server's
queue, the running one is interrupted if it is this client's, and the summary is printed. A second Ctrl-C
exits at once. Rerun the same command to resume.

Exit codes: 0 done; 2 the workflow or the flags cannot be used, or the server rejected the workflow (its node
errors are printed); 3 the server cannot be reached; 4 interrupted (Ctrl-C, or on the server); 5 a run timed
out; 1 a run failed while executing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .comfy_api import ComfyClient, ComfyError, PromptRejected, RunTimeout, ServerUnreachable

TEXT_ENCODERS = ("CLIPTextEncode", "ZImageChineseTextEncode")
ZEROED = ("ConditioningZeroOut",)
SAMPLERS = ("KSampler", "KSamplerAdvanced")
LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")
EXIT_REJECTED, EXIT_UNREACHABLE, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_FAILED = 2, 3, 4, 5, 1
MANIFEST = "manifest.jsonl"
STOP_WAIT = 60.0  # seconds Ctrl-C waits for the server to stop this client's running prompt


class WorkflowError(ValueError):
    """A workflow the flags cannot be applied to."""


# ---------------------------------------------------------------------------------------------------
# Reading a workflow.

def is_ui_workflow(data) -> bool:
    """The canvas's own format ("nodes" and "links" lists), which /prompt does not take."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def load_workflow(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkflowError(f"cannot read the workflow {path}: {e}") from None
    if is_ui_workflow(data):
        twin = Path(path).parent / "api" / Path(path).name
        where = (f"its API twin is {twin}" if twin.is_file() else
                 'export it in the canvas with "Export (API)" (Workflow menu)')
        raise WorkflowError(f"{path} is a UI workflow (the canvas's format, with nodes and links); the client sends the "
                            f"API format: {where}.")
    if not isinstance(data, dict) or not data or not all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (an object of nodes, each with a class_type); "
                            'export one in the canvas with "Export (API)".')
    return data


# ---------------------------------------------------------------------------------------------------
# Finding nodes: by type, by wiring, by group.

def of_type(prompt: dict, types) -> list[tuple[str, dict]]:
    return [(node_id, node) for node_id, node in prompt.items() if node.get("class_type") in types]


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def wired(prompt: dict, node: dict, input_name: str) -> dict | None:
    """The node an input is linked to (API format: [node_id, output_index])."""
    link = node["inputs"].get(input_name)
    return prompt.get(str(link[0])) if is_link(link) else None


def node_label(prompt: dict, node_id) -> str:
    """What a person sees on the canvas: the node's title, else its type, else its id."""
    node = prompt.get(str(node_id)) or {}
    return node.get("_meta", {}).get("title") or node.get("class_type") or f"node {node_id}"


def conditioning_sources(prompt: dict, node: dict, input_name: str) -> tuple[list[dict], list[dict]]:
    """(text encoders, zeroing nodes) whose conditioning reaches `node`'s input.

    Walks upstream through conditioning nodes: any input named conditioning* (ReferenceLatent,
    ConditioningSetArea, ConditioningCombine's conditioning_1/_2, ...), and for nodes that carry a
    positive/negative pair (ControlNetApplyAdvanced) the input matching the output used. It stops at a text
    encoder and at ConditioningZeroOut: a zeroed negative is made from the positive, whose text is not its own."""
    encoders, zeroed, seen = [], [], set()
    stack = [node["inputs"].get(input_name)]
    while stack:
        link = stack.pop()
        if not is_link(link) or (str(link[0]), link[1]) in seen:
            continue
        seen.add((str(link[0]), link[1]))
        upstream = prompt.get(str(link[0]))
        if upstream is None:
            continue
        kind, inputs = upstream.get("class_type"), upstream.get("inputs", {})
        if kind in TEXT_ENCODERS:
            encoders.append(upstream)
        elif kind in ZEROED:
            zeroed.append(upstream)
        else:
            follow = [value for name, value in inputs.items() if name.startswith("conditioning")]
            if "positive" in inputs and "negative" in inputs and link[1] in (0, 1):
                follow.append(inputs[("positive", "negative")[link[1]]])
            stack.extend(reversed(follow))
    return encoders, zeroed


def group_of(node: dict) -> str:
    """A node's group: its title's prefix before ": ", lowercased ("Edit: KSampler" -> "edit"); "" if none."""
    head, sep, _ = str(node.get("_meta", {}).get("title", "")).partition(": ")
    return head.strip().lower() if sep and head.strip() else ""


def group_name(group: str) -> str:
    return f'"{group}"' if group else "(untitled)"


def sampler_groups(prompt: dict) -> dict[str, list[tuple[str, dict]]]:
    """Each group's samplers, groups in the order of their first sampler in the file."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for node_id, node in of_type(prompt, SAMPLERS):
        groups.setdefault(group_of(node), []).append((node_id, node))
    return groups


def pick_group(prompt: dict, group: str | None = None) -> tuple[str, list[tuple[str, dict]], list[str]]:
    """(the group used, its samplers, the other groups): the named group, or the first in the file."""
    groups = sampler_groups(prompt)
    names = list(groups)
    if group is None:
        chosen = names[0] if names else ""
    else:
        chosen = group.strip().lower()
        if chosen not in groups:
            listed = ", ".join(group_name(n) for n in names) if any(names) else "none (its nodes' titles have no prefix)"
            raise WorkflowError(f"the workflow has no group {group!r}; its groups: {listed}")
    return chosen, groups.get(chosen, []), [n for n in names if n != chosen]


def group_note(prompt: dict, group: str | None) -> str | None:
    """The stderr line for a multi-group workflow addressed without --group."""
    chosen, _, others = pick_group(prompt, group)
    if group is not None or not others:
        return None
    return (f"note: --prompt, --negative, --seed and --steps go to the {group_name(chosen)} group (the first in the "
            f"workflow); it also has {', '.join(group_name(n) for n in others)}: choose with --group.")


# ---------------------------------------------------------------------------------------------------
# Setting inputs on an API-format workflow.

def apply_options(prompt: dict, *, text=None, negative=None, seed=None, width=None, height=None, steps=None,
                  model=None, text_encoder=None, vae=None, group=None) -> dict:
    """A copy of the workflow with the given values set on the nodes found by type, wiring and group."""
    prompt = copy.deepcopy(prompt)
    chosen, samplers, _ = pick_group(prompt, group)
    where = "the workflow's" if not chosen else f"the {group_name(chosen)} group's"
    if not samplers and any(v is not None for v in (text, negative, seed, steps)):
        raise WorkflowError("The workflow has no KSampler, so --prompt, --negative, --seed and --steps have nowhere to go.")
    found = {role: [conditioning_sources(prompt, s, role) for _, s in samplers] for role in ("positive", "negative")}
    encoders = {role: [e for enc, _ in found[role] for e in enc] for role in found}
    if negative is not None and any(e is p for e in encoders["negative"] for p in encoders["positive"]):
        raise WorkflowError(f"In {where} sampler the same text encoder feeds the positive and the negative input, so "
                            "--negative would change the positive prompt too.")
    for role, value in (("positive", text), ("negative", negative)):
        if value is None:
            continue
        if not encoders[role]:
            if any(zeroed for _, zeroed in found[role]):
                raise WorkflowError(f"{where.capitalize()} {role} conditioning is zeroed (ConditioningZeroOut): it has no "
                                    f"text to set, so --{'prompt' if role == 'positive' else 'negative'} has nowhere to go.")
            raise WorkflowError(f"No text encoder ({' or '.join(TEXT_ENCODERS)}) reaches {where} sampler's {role} input.")
        for encoder in encoders[role]:
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


def describe(prompt: dict, group: str | None = None) -> dict:
    """The prompt, negative and seed the group's first sampler will use, for the manifest."""
    chosen, samplers, _ = pick_group(prompt, group)
    record = {"prompt": None, "negative": None, "seed": None, "group": chosen or None}
    if samplers:
        sampler = samplers[0][1]
        for role, key in (("positive", "prompt"), ("negative", "negative")):
            texts = [e["inputs"].get("text") for e in conditioning_sources(prompt, sampler, role)[0]]
            record[key] = next((t for t in texts if isinstance(t, str)), None)
        seed = sampler["inputs"].get("noise_seed" if sampler["class_type"] == "KSamplerAdvanced" else "seed")
        record["seed"] = seed if isinstance(seed, int) else None
    return record


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
    status: str  # done, skipped, rejected, failed, interrupted, cancelled, timeout, unreachable
    images: list[Path] = field(default_factory=list)  # saved images, previews and the k_gen plot, as downloaded
    seconds: float = 0.0  # time the server spent running it
    message: str = ""
    k_gen: dict | None = None
    queue_seconds: float = 0.0  # time it waited in the server's queue


def run_key(prompt: dict) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def slug(text: str | None, limit: int = 24) -> str:
    """A short file-name-safe form of a prompt (letters of any script kept)."""
    return re.sub(r"[\W_]+", "-", text or "").strip("-").lower()[:limit].strip("-") or "workflow"


def file_prefix(number: int, total: int, text: str | None) -> str:
    return f"{number:0{max(3, len(str(total)))}d}_{slug(text)}"


def existing_files(out: Path, key: str) -> list[Path]:
    """Files an earlier run of the same workflow and settings left in `out` (named <prefix>_<key>_<name>)."""
    return sorted({*out.glob(f"*_{key}_*"), *out.glob(f"{key}_*")})


class Batch:
    """The prompts this client queued, so that Ctrl-C takes back exactly those and nothing else. Runs are queued
    in their order in the prompts file, whichever worker thread gets there first."""

    def __init__(self, server: str):
        self.turn = threading.Condition()
        self.next = 1  # the run whose turn it is to be queued
        self.released: set[int] = set()  # runs queued, skipped or given up
        self.stopping = threading.Event()  # Ctrl-C: queue nothing more
        self.settled = threading.Event()  # the server holds none of our prompts any more
        self.ids: list[str] = []
        self.server = server
        self.ctrl_c = 0

    def queue(self, number: int, client: ComfyClient, prompt: dict) -> str | None:
        # under the lock, so a prompt is either queued and listed before stop() reads the list, or not queued
        with self.turn:
            self.turn.wait_for(lambda: self.next == number or self.stopping.is_set())
            try:
                if self.stopping.is_set():
                    return None
                prompt_id = client.queue_prompt(prompt)
                self.ids.append(prompt_id)
                return prompt_id
            finally:
                self._release(number)

    def release(self, number: int) -> None:
        """Run `number` will queue nothing (skipped, failed before queueing, or done): the next may go."""
        with self.turn:
            self._release(number)

    def _release(self, number: int) -> None:
        self.released.add(number)
        while self.next in self.released:
            self.next += 1
        self.turn.notify_all()

    def stop(self, wait: float = STOP_WAIT) -> tuple[set, set, str]:
        """Queue nothing more, delete our pending prompts, interrupt ours if it runs, until the server holds none."""
        with self.turn:
            self.stopping.set()
            self.turn.notify_all()
            ids = list(self.ids)
        deleted, interrupted, problem = set(), set(), ""
        client = ComfyClient(self.server, timeout=5)
        deadline = time.monotonic() + wait
        try:
            while True:
                pending, running = client.cancel(ids)
                deleted.update(pending)
                interrupted.update(running)
                if not pending and not running:
                    break
                if time.monotonic() > deadline:
                    problem = f"the server has not stopped prompt {', '.join(running)} after {wait:.0f} s"
                    break
                time.sleep(0.25)
        except (ComfyError, OSError, ValueError) as e:
            problem = f"could not take the prompts back from the server: {e}"
        finally:
            self.settled.set()
        return deleted, interrupted, problem

    def abandon(self) -> None:
        """One quick try at the same, for the second Ctrl-C, which must not wait."""
        self.stopping.set()
        try:
            ComfyClient(self.server, timeout=1).cancel(list(self.ids))
        except (ComfyError, OSError, ValueError):
            pass


def run_one(client: ComfyClient, prompt: dict, out: Path, text: str, timeout: float, progress, *, prefix: str = "",
            queue=None, stopped=None) -> Outcome:
    """Run one prompt (or skip it when its files are in `out`); `queue` and `stopped` are ComfyClient.run's hooks."""
    key = run_key(prompt)
    done = existing_files(out, key)
    if done:
        return Outcome(text, "skipped", done, message="already in the output folder")
    try:
        result = client.run(prompt, timeout=timeout, on_message=progress, queue=queue, stopped=stopped)
    except PromptRejected as e:
        return Outcome(text, "rejected", message=str(e))
    except RunTimeout as e:
        try:  # a timed-out prompt would keep the server busy for nobody
            client.cancel([e.prompt_id])
        except (ComfyError, OSError, ValueError):
            pass
        return Outcome(text, "timeout", message=f"{e}; it was taken back from the server")
    except ServerUnreachable as e:
        return Outcome(text, "unreachable", message=str(e))
    times = {"seconds": result.run_seconds or 0.0, "queue_seconds": result.queue_seconds or 0.0}
    if result.status == "cancelled":
        return Outcome(text, "cancelled", message="not run: stopped by Ctrl-C", **times)
    if result.status == "interrupted":
        return Outcome(text, "interrupted", message="the run was interrupted on the server", **times)
    if result.status != "success":
        error = result.error or {}
        where = f"node {error.get('node_id')} ({error.get('node_type')})"
        return Outcome(text, "failed", message=f"{where}: {error.get('exception_message', '')}".strip(), **times)
    images = []
    try:
        for image in result.images(("output", "temp")):  # saved images, previews and the k_gen plot
            target = out / (f"{prefix}_{key}_{image['filename']}" if prefix else f"{key}_{image['filename']}")
            target.write_bytes(client.view(image))
            images.append(target)
    except (ComfyError, OSError) as e:  # HTTPError is an OSError
        for path in images:  # a partial set would make a rerun skip this run
            path.unlink(missing_ok=True)
        return Outcome(text, "failed", message=f"the run finished but its files could not be saved: {e}", **times)
    return Outcome(text, "done", images, k_gen=k_gen_of(result.outputs), **times)


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
    return f"k_gen {report['k_gen']:.3f} s⁻¹ ({report['nfe']} NFE in {report['seconds']:.2f} s)"


# ---------------------------------------------------------------------------------------------------
# What a person sees and keeps.

def fit(text: str, columns: int) -> str:
    """`text` cut to `columns` terminal cells (CJK characters take two)."""
    used = 0
    for i, char in enumerate(text):
        used += 2 if unicodedata.east_asian_width(char) in "WF" else 1
        if used > columns:
            return text[:i]
    return text


class Progress:
    """One line per run: on a terminal it is redrawn in place (node title, bar) while the run reports progress,
    then it ends with the run's outcome; elsewhere only the outcome line is printed."""

    def __init__(self, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.quiet, self.lock = quiet, threading.Lock()
        self.live = not quiet and self.stream.isatty()
        self.open = None  # the run whose line is being redrawn

    def _draw(self, text: str, end: str = "") -> None:
        if self.live:  # a line longer than the terminal would wrap, and \r would redraw only its last row
            text = "\r" + fit(text, shutil.get_terminal_size().columns - 1) + "\x1b[K"
        print(text, end=end, file=self.stream, flush=True)

    def for_run(self, label: str, prompt: dict):
        def show(msg: dict):
            if not self.live or msg.get("type") != "progress":
                return
            data = msg["data"]
            value, total = data.get("value", 0), max(data.get("max", 1), 1)
            filled = 20 * min(value, total) // total
            text = f"{label}: {node_label(prompt, data.get('node'))[:32]} [{'#' * filled}{'.' * (20 - filled)}] {value}/{total}"
            with self.lock:
                if self.open not in (None, label):
                    print(file=self.stream)
                self.open = label
                self._draw(text)
        return show

    def finish(self, label: str, outcome: Outcome) -> None:
        if self.quiet:
            return
        times = "" if outcome.status in ("skipped", "cancelled", "rejected") else \
            f" (waited {outcome.queue_seconds:.1f} s, ran {outcome.seconds:.1f} s)"
        with self.lock:
            if self.open not in (None, label):
                print(file=self.stream)
            self._draw(f"{label}: {outcome.status}{times}", end="\n")
            self.open = None


def exit_code(outcomes: list[Outcome]) -> int:
    order = [("rejected", EXIT_REJECTED), ("unreachable", EXIT_UNREACHABLE), ("interrupted", EXIT_INTERRUPTED),
             ("cancelled", EXIT_INTERRUPTED), ("timeout", EXIT_TIMEOUT), ("failed", EXIT_FAILED)]
    statuses = {o.status for o in outcomes}
    return next((code for status, code in order if status in statuses), 0)


def summary(outcomes: list[Outcome]) -> str:
    rows = ["| # | prompt | status | files | queue wait s | run s | k_gen |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, o in enumerate(outcomes, 1):
        k = f"{o.k_gen['k_gen']:.3f}" if o.k_gen and o.k_gen.get("k_gen") is not None else ""
        ran = o.status not in ("skipped", "cancelled", "rejected")
        rows.append(f"| {i} | {o.text[:40]} | {o.status} | {len(o.images)} | "
                    f"{f'{o.queue_seconds:.1f}' if ran else ''} | {f'{o.seconds:.1f}' if ran else ''} | {k} |")
    return "\n".join(rows)


class Manifest:
    """manifest.jsonl in --out: one record per run, keyed by the run's key; a rerun replaces a run's record only
    with news (a skipped run keeps the record of the run that made its files) and keeps every other record."""

    def __init__(self, out: Path):
        self.path, self.lock = out / MANIFEST, threading.Lock()

    def read(self) -> list[dict]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def update(self, record: dict) -> None:
        with self.lock:
            records = self.read()
            index = next((i for i, r in enumerate(records) if r.get("key") == record["key"]), None)
            if index is None:
                records.append(record)
            elif record["status"] != "skipped":
                records[index] = record
            else:
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, self.path)  # a Ctrl-C mid-write leaves the old manifest whole


def manifest_record(number: int, key: str, described: dict, workflow: Path, out: Path, outcome: Outcome) -> dict:
    ran = outcome.status not in ("skipped", "cancelled", "rejected")
    k_gen = {k: v for k, v in (outcome.k_gen or {}).items() if not isinstance(v, (list, dict))} or None
    return {"key": key, "run": number, **described, "workflow": str(workflow),
            "files": [str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in outcome.images],
            "status": outcome.status, "message": outcome.message,
            "queue_seconds": round(outcome.queue_seconds, 3) if ran else None,
            "run_seconds": round(outcome.seconds, 3) if ran else None, "k_gen": k_gen,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------------
# The command.

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zimage_client submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", type=Path, help="an API-format workflow (for example workflows/api/zimage-turbo.json)")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="the ComfyUI server's address")
    ap.add_argument("--prompt", help="positive prompt")
    ap.add_argument("--negative", help="negative prompt")
    ap.add_argument("--group", help="the group (title prefix, e.g. edit or inpaint) --prompt, --negative, --seed and "
                                    "--steps go to; default: the first")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--size", type=int, help="width and height in pixels")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--model", help="diffusion model for the Z-Image Checkpoint Loader")
    ap.add_argument("--text-encoder")
    ap.add_argument("--vae")
    ap.add_argument("--out", type=Path, default=Path("zimage-output"), help="folder for the images and manifest.jsonl "
                                                                             "(created)")
    ap.add_argument("--prompts-file", type=Path, help="one prompt a line: one run each (resumable)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="prompts kept queued on the server at once in batch mode; one server runs one prompt at a "
                         "time, so N > 1 only queues ahead, it does not run prompts in parallel")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _exit_on_ctrl_c)  # until a batch runs, Ctrl-C just ends
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _exit_on_ctrl_c(signum, frame):
    print("\nstopped (Ctrl-C)", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED)


def _main(args) -> int:
    try:
        workflow = load_workflow(args.workflow)
        if args.prompts_file:
            texts = [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            texts = [args.prompt]
        width, height = args.width or args.size, args.height or args.size
        prompts = [apply_options(workflow, text=t, negative=args.negative, seed=args.seed, width=width, height=height,
                                 steps=args.steps, model=args.model, text_encoder=args.text_encoder, vae=args.vae,
                                 group=args.group)
                   for t in texts]
    except (WorkflowError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    if any(v is not None for v in (args.prompt, args.prompts_file, args.negative, args.seed, args.steps)):
        note = group_note(workflow, args.group)
        if note:
            print(note, file=sys.stderr)
    if args.concurrency > 1 and len(prompts) > 1:
        print(f"note: --concurrency {args.concurrency} keeps up to {args.concurrency} prompts queued; the server runs "
              "them one at a time.", file=sys.stderr)
    client = ComfyClient(args.server)
    try:
        client.system_stats()
    except ServerUnreachable as e:
        print(f"error: the ComfyUI server at {args.server} cannot be reached ({e}). Start ComfyUI, or give --server.",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    args.out.mkdir(parents=True, exist_ok=True)
    upload_inputs(client, workflow, args.workflow)
    outcomes, stopped = run_batch(args, prompts, texts)
    for o in outcomes:
        if o.status in ("done", "skipped"):
            for path in o.images:
                print(path)
        elif o.status != "cancelled":
            print(f"{o.status}: {o.text}: {o.message}", file=sys.stderr)
        if o.k_gen:
            print(f"{k_gen_line(o.k_gen)} for {o.text}")
    if len(outcomes) > 1 or stopped:
        print(summary(outcomes))
    left = sum(o.status not in ("done", "skipped") for o in outcomes)
    if stopped and left:
        print(f"stopped by Ctrl-C: {left} run(s) not done; rerun the same command to run them (done runs are skipped).",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return exit_code(outcomes)


def run_batch(args, prompts: list[dict], texts: list[str | None]) -> tuple[list[Outcome], bool]:
    """Run every prompt, at most --concurrency queued at once; (outcomes, whether Ctrl-C stopped the batch)."""
    batch, manifest, progress = Batch(args.server), Manifest(args.out), Progress(args.quiet)
    total = len(prompts)

    def one(number: int, prompt: dict, text: str | None) -> Outcome:
        label = f"{number}/{total} {(text or 'run')[:30]}"
        described = describe(prompt, args.group)
        client = ComfyClient(args.server)
        try:
            outcome = run_one(client, prompt, args.out, text or "(workflow's prompt)", args.timeout,
                              progress.for_run(label, prompt), prefix=file_prefix(number, total, described["prompt"] or text),
                              queue=lambda p: batch.queue(number, client, p), stopped=batch.settled.is_set)
        finally:
            batch.release(number)
        progress.finish(label, outcome)
        manifest.update(manifest_record(number, run_key(prompt), described, args.workflow, args.out, outcome))
        return outcome

    def on_ctrl_c(signum, frame):
        batch.ctrl_c += 1
        if batch.ctrl_c > 1:  # the second one: no waiting, no traceback
            batch.abandon()
            print("\nstopped at once (second Ctrl-C); rerun the same command to resume.", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_INTERRUPTED)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
            futures = [pool.submit(one, n, p, t) for n, (p, t) in enumerate(zip(prompts, texts, strict=True), 1)]
            while not all(f.done() for f in futures):
                concurrent.futures.wait(futures, timeout=0.2)
                if batch.ctrl_c and not batch.stopping.is_set():
                    print("\nCtrl-C: stopping; taking back this client's prompts from the server "
                          "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
                    deleted, interrupted, problem = batch.stop()
                    print(f"removed {len(deleted)} queued prompt(s) from the server's queue"
                          + (", interrupted the running one" if interrupted else "")
                          + (f"; {problem}" if problem else ""), file=sys.stderr, flush=True)
            outcomes = [f.result() for f in futures]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return outcomes, bool(batch.ctrl_c)


if __name__ == "__main__":
    sys.exit(main())
