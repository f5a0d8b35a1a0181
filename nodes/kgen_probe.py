"""Z-Image k_gen Probe and Report: generation kinetics measured inside the graph.

The Z-Image-ComfyUI performance study treats a generation as a chemical reaction: a rate constant
k_gen = NFE / Δt, a convergence law dI/dt = k_gen·C_text·(1 − I) whose linearised form
1/(1 − I) = k_gen·C_text·t + 1 is fitted over the intermediate predictions, and an Arrhenius-like fit
ln k_gen = ln A − (E_a/R)/T across GPU temperatures. The probe makes those figures measurable in any workflow.

The probe is a keyed PREDICT_NOISE wrapper (one call per guided model evaluation, cond and uncond together:
one NFE) and an OUTER_SAMPLE wrapper that opens and closes a run. Per evaluation it keeps the sigma, the
x0 prediction pooled to a few latent pixels, a time stamp (a CUDA event on a GPU, read once at the end of the
run, so the GPU is never waited on mid-run) and, on CUDA, the allocator's peak. A thread samples GPU
temperature, SM clock and power through NVML while the run lasts. The report turns a run into figures,
plots, a JSON file next to the outputs, and a line in a history file in ComfyUI's user directory. The maths
(convergence, the fits, t₁, the history's lines) is kinetics.py, which needs no ComfyUI.
"""
from __future__ import annotations

import json
import logging
import math
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import comfy.patcher_extension
import folder_paths
import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io
from PIL import Image

from .kinetics import (
    arrhenius,
    arrhenius_points,
    convergence,
    convergence_time,
    finite_figures,
    history_key,
    kinetics_fit,
    parse_history,
)
from .shared import PromptStats, ZImageError

log = logging.getLogger("comfyui-zimage")

WRAPPER_KEY = "zimage_kgen_probe"
KGenRecord = io.Custom("ZIMAGE_KGEN_RECORD")
DEFAULT_C_TEXT = 1.0  # with no prompt statistics the fitted slope is k_gen·C_text with C_text = 1
DEFAULT_HISTORY = "zimage-kgen/history.jsonl"
NVML_INTERVAL_S = 0.1


class KGenError(ZImageError):
    """A probe record or option the report cannot use, with what to do about it."""


# ---------------------------------------------------------------------------------------------------
# Nodes.

class ZImageKGenProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageKGenProbe",
            display_name="Z-Image k_gen Probe",
            category="Z-Image/measure",
            description="Records every model evaluation of the next sampling runs (time, sigma, a small copy of the "
                        "x0 prediction, GPU memory, temperature, clock and power) for the Z-Image k_gen Report. "
                        "Adds well under 1% to sampling time.",
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion model; the input model is not changed."),
                io.String.Input("label", default="",
                                tooltip="Name of the model in the history (empty: the variant the Z-Image loader "
                                        "found, else the model's class and size)."),
                io.Int.Input("x0_size", default=32, min=4, max=256,
                             tooltip="Each x0 prediction is kept pooled to at most this many latent pixels a side: "
                                     "enough for the convergence curve, a few KiB per step."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     KGenRecord.Output(display_name="record", tooltip="Connect to Z-Image k_gen Report.")],
        )

    @classmethod
    def execute(cls, model, label="", x0_size=32) -> io.NodeOutput:
        probe = Probe(label.strip() or model_label(model), x0_size)
        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, probe.outer_sample_wrapper)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, probe.predict_noise_wrapper)
        return io.NodeOutput(patched, probe)


class ZImageKGenReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageKGenReport",
            display_name="Z-Image k_gen Report",
            category="Z-Image/measure",
            description="Turns the probe's record of the last sampling run into k_gen = NFE/Δt, the convergence "
                        "curve I(t) and its linearised fit, peak memory and temperature; keeps a history and fits "
                        "Arrhenius over it once it holds 3 temperatures.",
            inputs=[
                KGenRecord.Input("record", tooltip="The record output of Z-Image k_gen Probe."),
                io.Latent.Input("samples", tooltip="The sampler's final LATENT: the target I(t) converges to."),
                PromptStats.Input("prompt_stats", optional=True,
                                  tooltip="Prompt statistics from Z-Image Chinese Text Encode; their C_text is used."),
                io.Float.Input("c_text", default=DEFAULT_C_TEXT, min=1e-6, max=1e6, step=0.01,
                               tooltip="Text concentration C_text when no prompt statistics are connected. With the "
                                       "default 1.0, the fitted slope is k_gen·C_text itself."),
                io.Float.Input("convergence_threshold", default=0.95, min=0.01, max=0.9999, step=0.01,
                               tooltip="t₁ is the first time I(t) reaches this value."),
                io.Boolean.Input("image_space", default=False,
                                 tooltip="Also measure I(t) on a cheap RGB preview of the latents (the model's "
                                         "latent-to-RGB factors; no VAE decode)."),
                io.Boolean.Input("save_history", default=True,
                                 tooltip="Append this run to the history file and fit Arrhenius over it."),
                io.String.Input("history_file", default=DEFAULT_HISTORY,
                                tooltip="JSON-lines file in the plugin's folder zimage-kgen/ of ComfyUI's user "
                                        "directory, given relative to the user directory (it cannot leave that folder)."),
                io.String.Input("filename_prefix", default="zimage-kgen/run",
                                tooltip="The report's JSON is saved in the output directory under this prefix."),
            ],
            outputs=[io.Image.Output(display_name="plots", tooltip="I(t), the linearised fit, and the Arrhenius plot."),
                     io.String.Output(display_name="json", tooltip="Every figure of the report as JSON.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, record, samples, prompt_stats=None, c_text=DEFAULT_C_TEXT, convergence_threshold=0.95,
                image_space=False, save_history=True, history_file=DEFAULT_HISTORY,
                filename_prefix="zimage-kgen/run") -> io.NodeOutput:
        if not isinstance(record, Probe):
            raise KGenError("The record input must come from Z-Image k_gen Probe's record output.")
        if prompt_stats is not None and prompt_stats.get("c_text") is not None:
            c_text, c_text_source = float(prompt_stats["c_text"]), "prompt statistics"
        else:
            c_text_source = "c_text input" if c_text != DEFAULT_C_TEXT else "default (1.0)"
        for name, value in (("c_text", c_text), ("convergence_threshold", convergence_threshold)):
            if not math.isfinite(value):
                raise KGenError(f"{name} is {value}; give a finite number (c_text > 0, a threshold between 0 and 1).")
        report = make_report(record, samples["samples"], c_text, convergence_threshold, image_space)
        report["c_text_source"] = c_text_source
        report = finite_figures(report)
        if save_history and report.get("k_gen") is not None:
            report["history"], notes = update_history(history_file, report)
            report["messages"] = report.get("messages", []) + notes
        image = plot(report)
        shown = save_report(filename_prefix, report, image)
        text = json.dumps(report, ensure_ascii=False, allow_nan=False)
        return io.NodeOutput(image, text, ui={"images": [shown], "text": summary_lines(report), "json": [text]})


def model_label(model) -> str:
    variant = getattr(model.model, "zimage_variant", None)
    if variant:
        return f"z-image-{variant}"
    diffusion_model = model.model.diffusion_model
    params = sum(p.numel() for p in diffusion_model.parameters())
    return f"{type(diffusion_model).__name__} {params / 1e6:.0f}M"


# ---------------------------------------------------------------------------------------------------
# Recording.

@dataclass
class Evaluation:
    sigma: torch.Tensor  # kept as the sampler passed it: reading it would wait for the GPU
    x0: torch.Tensor  # pooled x0 prediction (B, C, h, w), on the model's device
    stamp: object  # CUDA event, or perf_counter seconds
    peak_bytes: int | None


@dataclass(frozen=True)
class RunRecord:
    """One finished (or stopped) sampling run in plain numbers: what the report reads."""
    device: torch.device
    latent_shape: tuple
    planned_steps: int
    spatial_ratio: int
    completed: bool
    error: str | None
    times: tuple[float, ...]  # seconds from the first evaluation's start to each evaluation's end
    sigmas: tuple[float, ...]
    x0: torch.Tensor | None  # pooled x0 predictions (NFE, B, C, h, w) on the CPU
    peak_bytes: int | None
    telemetry: dict  # telemetry_summary's figures
    telemetry_unavailable: str | None  # why there is no telemetry


@dataclass
class Recording:
    """A sampling run while it runs: the wrappers append to it; `finish` reads the device once and returns the
    frozen RunRecord."""
    device: torch.device
    latent_shape: tuple
    planned_steps: int
    spatial_ratio: int
    start_stamp: object
    evaluations: list[Evaluation] = field(default_factory=list)
    telemetry: Telemetry | None = None
    telemetry_unavailable: str | None = None  # why there is no telemetry

    def finish(self, completed: bool, error: str | None = None) -> RunRecord:
        if self.telemetry is not None:
            self.telemetry.stop()
        evaluations, times = self.evaluations, []
        if evaluations and self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                times = [self.start_stamp.elapsed_time(e.stamp) / 1000.0 for e in evaluations]
            except RuntimeError as e:  # a failed device: keep the run's own error, drop the times
                log.warning("k_gen probe: could not read CUDA times: %s", e)
                evaluations = []
        elif evaluations:
            times = [e.stamp - self.start_stamp for e in evaluations]
        peaks = [e.peak_bytes for e in evaluations if e.peak_bytes is not None]
        record = RunRecord(
            device=self.device, latent_shape=self.latent_shape, planned_steps=self.planned_steps,
            spatial_ratio=self.spatial_ratio, completed=completed, error=error, times=tuple(times),
            sigmas=tuple(float(e.sigma.flatten()[0]) for e in evaluations),
            x0=torch.stack([e.x0.float().cpu() for e in evaluations]) if evaluations else None,
            peak_bytes=max(peaks) if peaks else None, telemetry=telemetry_summary(self.telemetry),
            telemetry_unavailable=self.telemetry_unavailable)
        self.evaluations = []  # the device tensors and events have been read
        return record


class Probe:
    """The probe's record: the wrappers write into it, the report reads its last run."""

    def __init__(self, label: str, x0_size: int = 32):
        self.label, self.x0_size = label, x0_size
        self.recording: Recording | None = None  # the run under way
        self.run: RunRecord | None = None  # the last run, once it ended
        self.latent_format = None  # the sampled model's, to put x0 predictions in the LATENT's scaling

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        noise, sigmas = args[0], args[3]
        guider = executor.class_obj
        device = torch.device(guider.model_patcher.load_device)
        self.latent_format = guider.model_patcher.model.latent_format
        telemetry, why_not = Telemetry.start(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # Δt starts at the first evaluation, not here: sampling first loads the model and prepares the conds
        recording = Recording(device=device, latent_shape=tuple(noise.shape), planned_steps=max(0, len(sigmas) - 1),
                  spatial_ratio=getattr(self.latent_format, "spacial_downscale_ratio", 8),
                  start_stamp=None, telemetry=telemetry, telemetry_unavailable=why_not)
        self.recording = recording
        try:
            out = executor(*args, **kwargs)
        except BaseException as e:  # interrupted or failed: keep what was recorded, say why
            self.run = recording.finish(False, f"{type(e).__name__}: {e}".strip(": "))
            raise
        finally:
            self.recording = None
        self.run = recording.finish(True)
        return out

    def predict_noise_wrapper(self, executor, x, timestep, model_options, seed):
        recording = self.recording
        if recording is not None and recording.start_stamp is None:
            recording.start_stamp = stamp(recording.device)
        out = executor(x, timestep, model_options, seed)
        if recording is not None:
            recording.evaluations.append(self.evaluation(recording, timestep, out))
        return out

    def evaluation(self, recording: Recording, timestep, out) -> Evaluation:
        x0 = out.detach()
        video = x0.ndim == 5
        if video:  # video-shaped latents (B, C, T, H, W): keep the first frame
            x0 = x0[:, :, 0]
        if x0.ndim == 4 and max(x0.shape[-2:]) > self.x0_size:
            h, w = x0.shape[-2:]
            scale = self.x0_size / max(h, w)
            x0 = F.adaptive_avg_pool2d(x0.float(), (max(1, round(h * scale)), max(1, round(w * scale))))
        if self.latent_format is not None:  # into the LATENT's scaling: a per-channel affine map, so after pooling
            x0 = self.latent_format.process_out(x0[:, :, None] if video else x0)
            x0 = x0[:, :, 0] if video else x0
        peak = torch.cuda.max_memory_allocated(recording.device) if recording.device.type == "cuda" else None
        return Evaluation(sigma=timestep.detach().flatten()[:1].clone(), x0=x0.clone(), stamp=stamp(recording.device),
                          peak_bytes=peak)


def stamp(device: torch.device):
    """Now, as the device sees it: a CUDA event recorded on the device's stream (read after the run), or the
    CPU's perf_counter."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return event
    return time.perf_counter()


class Telemetry:
    """GPU temperature (°C), SM clock (MHz) and power (W) sampled through NVML on a thread while a run lasts;
    NVML queries are host-side and never wait for the GPU."""

    def __init__(self, handle, pynvml):
        self.handle, self.nvml = handle, pynvml
        self.samples: list[tuple[float, float, float, float]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="zimage-kgen-nvml", daemon=True)

    @staticmethod
    def start(device: torch.device) -> tuple[Telemetry | None, str | None]:
        """(sampling telemetry, None), or (None, why there is none)."""
        if device.type != "cuda":
            return None, (f"the model ran on {device.type.upper()}: GPU temperature, clock and power exist only on "
                          "a CUDA GPU")
        handle, pynvml_or_reason = nvml_handle(device)
        if handle is None:
            return None, pynvml_or_reason
        telemetry = Telemetry(handle, pynvml_or_reason)
        telemetry.sample()
        telemetry.thread.start()
        return telemetry, None

    def sample(self) -> None:
        n = self.nvml
        try:
            self.samples.append((time.perf_counter(), float(n.nvmlDeviceGetTemperature(self.handle, n.NVML_TEMPERATURE_GPU)),
                                 float(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)),
                                 n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0))
        except Exception as e:  # a query this GPU does not support: stop sampling, keep what we have
            log.debug("NVML sample failed: %s", e)
            self.done.set()

    def loop(self) -> None:
        while not self.done.wait(NVML_INTERVAL_S):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=1.0)
        self.sample()


def nvml_handle(device: torch.device):
    """(NVML handle of this CUDA device (honouring CUDA_VISIBLE_DEVICES), the pynvml module), or (None, reason)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)
        return pynvml.nvmlDeviceGetHandleByIndex(to_nvml(index) if to_nvml else index), pynvml
    except Exception as e:
        return None, f"NVML is not available: {e}"


# ---------------------------------------------------------------------------------------------------
# The report.

def make_report(probe: Probe, final_latent: torch.Tensor, c_text: float, threshold: float, image_space: bool) -> dict:
    run = probe.run
    if run is None:
        raise KGenError("The probe has recorded no sampling run. Sample with the probe's MODEL output first (the "
                        "report must come after the sampler: connect the sampler's LATENT to its samples input).")
    messages = []
    nfe = len(run.times)
    side_h, side_w = run.latent_shape[-2] * run.spatial_ratio, run.latent_shape[-1] * run.spatial_ratio
    report = {"label": probe.label, "device": device_name(run.device), "resolution": f"{side_w}x{side_h}",
              "batch": int(run.latent_shape[0]), "nfe": nfe, "planned_steps": run.planned_steps,
              "completed": run.completed, "c_text": c_text, "convergence_threshold": threshold}
    if not run.completed:
        messages.append(f"The sampling run did not finish ({run.error or 'stopped'}) after {nfe} model evaluations: "
                        "the figures cover the evaluations that ran.")
    if nfe == 0:
        messages.append("No model evaluation was recorded: nothing to measure.")
        report.update(seconds=None, k_gen=None, messages=messages)
        return report
    seconds = run.times[-1]
    # k_gen to 6 significant digits: four decimals left a slow CPU run's k_gen (~0.4) off by 1e-4 of itself
    report.update(seconds=round(seconds, 6), k_gen=float(f"{nfe / seconds:.6g}") if seconds > 0 else None,
                  times_s=[round(t, 6) for t in run.times], sigmas=[round(s, 6) for s in run.sigmas],
                  peak_memory_bytes=run.peak_bytes)
    if run.peak_bytes is None:
        messages.append("Peak memory is measured on CUDA only.")
    report.update(run.telemetry)
    if report.get("temperature_c") is None:
        report["telemetry_unavailable"] = run.telemetry_unavailable or "NVML gave no readings"
        messages.append("No GPU temperature: " + report["telemetry_unavailable"] + " (no Arrhenius fit).")

    x0, latent_format = run.x0, probe.latent_format
    if tuple(final_latent.shape) != tuple(run.latent_shape):
        messages.append(f"The samples input {tuple(final_latent.shape)} is not the output of the probe's last run "
                        f"{tuple(run.latent_shape)} (the probe keeps only the last run of its MODEL): no convergence "
                        "curve.")
    else:
        final = pool_like(final_latent, x0.shape[-2:])
        curve = convergence(x0, final)
        report["convergence"] = [round(v, 6) for v in curve]
        report["fit"] = kinetics_fit(run.times, curve, c_text)
        report["t1_s"] = convergence_time(run.times, curve, threshold)
        messages += [report["fit"][k] for k in ("error", "note") if report["fit"].get(k)]
        if image_space:
            factors = getattr(latent_format, "latent_rgb_factors", None)
            if factors is None or len(factors) != x0.shape[2]:
                messages.append("This model's latent format has no latent-to-RGB factors for its channels: no "
                                "image-space curve.")
            else:
                bias = getattr(latent_format, "latent_rgb_factors_bias", None)
                rgb, target = latent_rgb(x0, factors, bias), latent_rgb(final, factors, bias)
                image_curve = convergence(rgb, target)
                report["convergence_image"] = [round(v, 6) for v in image_curve]
                report["fit_image"] = kinetics_fit(run.times, image_curve, c_text)
    report["messages"] = messages
    return report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def telemetry_summary(t: Telemetry | None) -> dict:
    if t is None or not t.samples:
        return {"temperature_c": None}
    temps, clocks, power = (np.array([s[i] for s in t.samples]) for i in (1, 2, 3))
    return {"temperature_c": round(float(temps.mean()), 2), "temperature_max_c": float(temps.max()),
            "sm_clock_mhz": round(float(clocks.mean()), 1), "power_w": round(float(power.mean()), 2),
            "telemetry_samples": len(t.samples)}


def pool_like(latent: torch.Tensor, size) -> torch.Tensor:
    """The final latent pooled the way the probe pooled the x0 predictions, (B, C, h, w)."""
    z = latent.detach().float().cpu()
    if z.ndim == 5:
        z = z[:, :, 0]
    if z.shape[-2:] != tuple(size):
        z = F.adaptive_avg_pool2d(z, tuple(size))
    return z


def latent_rgb(z: torch.Tensor, factors, bias) -> torch.Tensor:
    """The latent previewer's linear RGB: (..., C, h, w) -> (..., 3, h, w)."""
    f = torch.tensor(factors, dtype=torch.float32)  # (C, 3)
    rgb = torch.einsum("...chw,cr->...rhw", z.float(), f)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, dtype=torch.float32)[:, None, None]
    return rgb


# ---------------------------------------------------------------------------------------------------
# History, saved JSON, plots.

HISTORY_FOLDER = "zimage-kgen"  # under ComfyUI's user directory: every file in it is this plugin's


def history_path(name: str) -> Path:
    """The history file, inside the plugin's own folder of ComfyUI's user directory; anything else is refused, so
    another tool's file is never touched."""
    user = Path(folder_paths.get_user_directory()).resolve()
    ours = (user / HISTORY_FOLDER).resolve()
    path = (user / name).resolve() if name.strip() and "\0" not in name else ours
    if not path.is_relative_to(ours) or path == ours:
        raise KGenError(f"history_file {name!r} is outside the plugin's folder {HISTORY_FOLDER}/ of ComfyUI's user "
                        f"directory; give a file in it, such as {DEFAULT_HISTORY!r}.")
    if path.suffix != ".jsonl" or path.is_dir():
        raise KGenError(f"history_file {name!r} must name a .jsonl file, such as {DEFAULT_HISTORY!r}.")
    return path


def read_history(path: Path) -> tuple[list[dict], str | None]:
    """The history's entries. JSON lines end at "\\n" only (a label may hold U+2028, which str.splitlines would
    split on); a line that is not a JSON object is skipped and counted, and the file is left as it is."""
    if not path.exists():
        return [], None
    entries, bad = parse_history(path.read_bytes().decode("utf-8", errors="replace"))
    problem = (f"{bad} line(s) of {path.name} are not k_gen runs and were left out of the fit (the file is kept as "
               "it is)." if bad else None)
    return entries, problem


def update_history(name: str, report: dict) -> tuple[dict, list[str]]:
    """Append the report's run to the history file and fit Arrhenius over it. Returns the report's "history" entry
    and the messages for its reader (the report itself is left as it is)."""
    try:
        path = history_path(name)
    except KGenError as e:
        return {"saved": False, "error": str(e)}, [str(e)]
    entries, problem = read_history(path)
    messages = [problem] if problem else []
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "label": report["label"], "device": report["device"],
             "resolution": report["resolution"], "batch": report["batch"], "nfe": report["nfe"],
             "seconds": report["seconds"], "k_gen": report["k_gen"], "temperature_c": report.get("temperature_c"),
             "sm_clock_mhz": report.get("sm_clock_mhz"), "power_w": report.get("power_w")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    entries.append(entry)
    points = arrhenius_points(entries, entry)
    fit = arrhenius(points)
    if fit.get("error"):
        messages.append(fit["error"])
    history = {"saved": True, "file": str(path.relative_to(Path(folder_paths.get_user_directory()).resolve())),
               "runs": len(entries), "runs_same_key": len([e for e in entries if history_key(e) == history_key(entry)]),
               "arrhenius": fit, "arrhenius_points": points}
    return history, messages


def save_report(prefix: str, report: dict, image: torch.Tensor) -> dict:
    """The report as JSON and its plot as PNG, side by side in the output directory under one name (a preview's
    ComfyUI_temp_ name would say nothing of the run). Sets report["saved_to"] and ["plot"] (paths relative to the
    output directory); returns the plot's entry for the UI."""
    if "\0" in prefix or len(prefix) > 200:
        raise KGenError(f"filename_prefix {prefix[:40]!r}… is not a usable file name (a NUL character, or over 200 "
                        "characters); give a short one such as 'zimage-kgen/run'.")
    output_dir = folder_paths.get_output_directory()
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir)
    stem, folder = f"{filename}_{counter:05}_", Path(full_folder)
    folder.mkdir(parents=True, exist_ok=True)
    relative = f"{subfolder}/{stem}" if subfolder else stem
    report["saved_to"], report["plot"] = f"{relative}.json", f"{relative}.png"
    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    Image.fromarray(pixels).save(folder / f"{stem}.png", compress_level=4)
    (folder / f"{stem}.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"filename": f"{stem}.png", "subfolder": subfolder, "type": "output"}


def summary_lines(report: dict) -> list[str]:
    if report.get("k_gen") is None:
        return report.get("messages") or ["nothing measured"]
    lines = [f"{report['label']} on {report['device']}, {report['resolution']} x{report['batch']}: "
             f"{report['nfe']} NFE in {report['seconds']:.3f} s, k_gen = {report['k_gen']:.3f} s⁻¹"]
    fit = report.get("fit") or {}
    if "slope" in fit:
        sign = "+" if fit["intercept"] >= 0 else "−"
        lines.append(f"fit 1/(1−I) = {fit['slope']:.3f}·t {sign} {abs(fit['intercept']):.3f}, R² = {fit['r2']:.3f}, "
                     f"k_gen·C_text = {fit['k_gen_c_text']:.3f} s⁻¹"
                     + (f", t₁ = {report['t1_s']:.3f} s" if report.get("t1_s") is not None else ""))
    if report.get("peak_memory_bytes") is not None:
        lines.append(f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB")
    if report.get("temperature_c") is not None:
        lines.append(f"GPU {report['temperature_c']:.1f} °C, {report['sm_clock_mhz']:.0f} MHz, {report['power_w']:.0f} W")
    fit_a = (report.get("history") or {}).get("arrhenius") or {}
    if "ea_over_r_k" in fit_a:
        lines.append(f"Arrhenius over {fit_a['n']} runs: E_a/R = {fit_a['ea_over_r_k']:.0f} K, "
                     f"ln A = {fit_a['ln_a']:.2f}, R² = {fit_a['r2']:.3f}")
    return lines + report.get("messages", [])


def plot(report: dict) -> torch.Tensor:
    """The plots as an IMAGE (1, H, W, 3): I(t), the linearised fit, and the Arrhenius scatter with its line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_i, ax_lin, ax_arr = fig.subplots(1, 3)
    times, curve = report.get("times_s") or [], report.get("convergence") or []
    if curve:
        ax_i.plot(times, curve, "o-", color="tab:red", label="latent")
        if report.get("convergence_image"):
            ax_i.plot(times, report["convergence_image"], "s--", color="tab:blue", label="RGB preview")
        ax_i.axhline(report["convergence_threshold"], color="grey", lw=0.8)
        ax_i.legend(loc="lower right")
    ax_i.set(title="convergence I(t)", xlabel="t (s)", ylabel="I")
    fit = report.get("fit") or {}
    if "slope" in fit:
        pts = fit["line_points"]  # the points the fit was made on, and only those
        ax_lin.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="tab:red")
        xs = np.linspace(0, max(p[0] for p in pts), 50)
        ax_lin.plot(xs, fit["slope"] * xs + fit["intercept"], "-", color="black",
                    label=f"slope {fit['slope']:.3g} s⁻¹, R² {fit['r2']:.3f}")
        ax_lin.legend(loc="upper left")
    else:
        ax_lin.text(0.5, 0.5, "no fit:\nneeds 2 intermediate steps", ha="center", va="center", transform=ax_lin.transAxes)
    ax_lin.set(title="linearised: 1/(1−I) vs t", xlabel="t (s)", ylabel="1/(1−I)")
    history = report.get("history") or {}
    points = history.get("arrhenius_points") or []
    if points:
        x = [1 / (t + 273.15) for t, _ in points]
        ax_arr.plot(x, [math.log(k) for _, k in points], "o", color="tab:green")
        fit_a = history.get("arrhenius") or {}
        if "ea_over_r_k" in fit_a:
            xs = np.linspace(min(x), max(x), 20)
            ax_arr.plot(xs, fit_a["ln_a"] - fit_a["ea_over_r_k"] * xs, "-", color="black",
                        label=f"E_a/R {fit_a['ea_over_r_k']:.0f} K, R² {fit_a['r2']:.2f}")
            ax_arr.legend(loc="upper right")
    if not points or "ea_over_r_k" not in (history.get("arrhenius") or {}):
        reason = report.get("telemetry_unavailable") or "needs runs at 3 GPU temperatures"
        ax_arr.text(0.5, 0.5, "no Arrhenius fit:\n" + textwrap.fill(reason, 40), ha="center", va="center",
                    transform=ax_arr.transAxes, fontsize=8)
    ax_arr.set(title="Arrhenius: ln k_gen vs 1/T", xlabel="1/T (1/K)", ylabel="ln k_gen")
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)[None]


NODES = [ZImageKGenProbe, ZImageKGenReport]  # what this module adds to ComfyUI
