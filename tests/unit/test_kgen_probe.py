"""k_gen probe, in-process: the kinetics maths on synthetic curves, recording during real sampling, the history,
the plot."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfyui_zimage
import folder_paths
import numpy as np
import pytest
import torch
from comfyui_zimage.nodes import entropy_attention as ea
from comfyui_zimage.nodes import kgen_probe as kg
from comfyui_zimage.nodes import kinetics as kin
from comfyui_zimage.nodes.loader import ZImageCheckpointLoader
from PIL import Image

# ---------------------------------------------------------------------------------------------------
# Maths on exact synthetic data.


@pytest.mark.parametrize("k, c_text", [(11.11, 1.0), (7.41, 1.0), (9.35, 2.5), (0.8, 0.3)])
def test_linearised_fit_recovers_k_from_an_exact_curve(k, c_text):
    times = [0.05 * (i + 1) for i in range(12)]
    curve = [1 - 1 / (k * c_text * t + 1) for t in times]  # 1/(1-I) = k·C·t + 1 exactly
    fit = kin.kinetics_fit(times, curve, c_text)
    assert fit["k_gen"] == pytest.approx(k, rel=0.01)
    assert fit["intercept"] == pytest.approx(1.0, abs=1e-6)
    assert fit["r2"] > 0.99


def test_first_order_fit_recovers_k_from_an_exponential_curve():
    k, times = 3.0, [0.1 * (i + 1) for i in range(10)]
    fit = kin.kinetics_fit(times, [1 - math.exp(-k * t) for t in times], 1.0)
    assert fit["first_order"]["k_gen"] == pytest.approx(k, rel=0.01)
    assert fit["first_order"]["r2"] > 0.99
    assert fit["r2"] < fit["first_order"]["r2"]  # the second-order line fits it worse: the fits can disagree


def test_fit_needs_two_intermediate_points():
    assert "error" in kin.kinetics_fit([0.1], [0.3], 1.0)
    assert "error" in kin.kinetics_fit([0.1, 0.2], [0.4, 1.0], 1.0)  # the final point (I = 1) is not a point
    assert kin.kinetics_fit([0.1, 0.2, 0.3], [0.1, 0.5, 1.0], 1.0)["points"] == 2


def test_a_final_prediction_off_by_rounding_does_not_take_over_the_fit():
    """A sampler ending at sigma 0 predicts the final sample at its last call, equal up to float rounding."""
    k, times = 5.0, [0.05 * (i + 1) for i in range(8)]
    curve = [1 - 1 / (k * t + 1) for t in times]
    exact = kin.kinetics_fit(times + [0.45], curve + [1.0], 1.0)
    rounded = kin.kinetics_fit(times + [0.45], curve + [1.0 - 2e-9], 1.0)
    assert rounded["points"] == exact["points"] == len(times)
    assert rounded["k_gen"] == pytest.approx(k, rel=0.01) == exact["k_gen"]


def test_the_plot_draws_exactly_the_points_the_fit_used(monkeypatch):
    """A last prediction 5e-5 off the final sample is left out of the fit (1 − I ≤ 1e-4): it is not drawn either."""
    import matplotlib.axes

    k, times = 5.0, [0.05 * (i + 1) for i in range(8)] + [0.45]
    curve = [1 - 1 / (k * t + 1) for t in times[:-1]] + [1.0 - 5e-5]
    fit = kin.kinetics_fit(times, curve, 1.0)
    assert fit["points"] == 8 and [t for t, _ in fit["line_points"]] == times[:-1]
    drawn, draw = [], matplotlib.axes.Axes.plot

    def recording(ax, *args, **kwargs):
        drawn.append((args, kwargs))
        return draw(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    kg.plot({"times_s": times, "convergence": curve, "convergence_threshold": 0.95, "fit": fit})
    markers = [(list(args[0]), list(args[1])) for args, kwargs in drawn
               if args[2:] == ("o",) and kwargs.get("color") == "tab:red"]
    assert markers == [([t for t, _ in fit["line_points"]], [y for _, y in fit["line_points"]])]


def test_the_kinetics_need_no_comfyui_and_no_torch():
    """kinetics.py is plain maths: it loads on its own, without ComfyUI, the plugin or torch."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('kinetics', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "loaded = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'torch')]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code, kin.__file__], check=True)


def test_arrhenius_recovers_activation_temperature():
    ea_over_r, ln_a = 1200.0, 9.8
    points = [(t, math.exp(ln_a - ea_over_r / (t + 273.15))) for t in (45.0, 55.0, 63.0, 71.0, 80.0)]
    fit = kin.arrhenius(points)
    assert fit["ea_over_r_k"] == pytest.approx(ea_over_r, rel=1e-6)
    assert fit["ln_a"] == pytest.approx(ln_a, rel=1e-6)
    assert fit["r2"] > 0.999 and fit["n"] == 5


def test_arrhenius_needs_three_temperatures():
    fit = kin.arrhenius([(50.0, 9.0), (50.0, 9.1), (60.0, 9.5)])
    assert fit["distinct_temperatures"] == 2 and "3 or more" in fit["error"]


def test_convergence_is_zero_at_the_first_prediction_and_one_at_the_final():
    final = torch.randn(1, 4, 8, 8)
    start = torch.randn(1, 4, 8, 8)
    predictions = torch.stack([start + (final - start) * a for a in (0.0, 0.25, 0.5, 1.0)])
    assert kin.convergence(predictions, final) == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert kin.convergence_time([0.1, 0.2, 0.3, 0.4], [0.0, 0.25, 0.5, 1.0], 0.5) == 0.3
    assert kin.convergence_time([0.1, 0.2], [0.0, 0.25], 0.95) is None


# ---------------------------------------------------------------------------------------------------
# Recording real sampling runs on the nano model.

@pytest.fixture(scope="module")
def nano():
    comfyui_zimage.register_model_folders()
    model, clip, _ = ZImageCheckpointLoader.execute("diffusion_models/nano_zimage_base.safetensors", "nano_qwen3.safetensors",
                                                    "nano_ae.safetensors", "default", "default").result[:3]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("蓝色背景上的红色圆形"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, cond, uncond


@pytest.fixture()
def dirs(tmp_path):
    """Output and user directories of this test (restored afterwards)."""
    old = folder_paths.get_output_directory(), folder_paths.get_user_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_user_directory(str(tmp_path / "user"))
    yield tmp_path
    folder_paths.set_output_directory(old[0])
    folder_paths.set_user_directory(old[1])


def sample(model, cond, uncond, steps=6, cfg=4.0, batch=2, sampler="euler", callback=None):
    latent = torch.zeros(batch, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 5)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", cond, uncond, latent, seed=5,
                               disable_pbar=True, callback=callback)


def probe(model, label=""):
    patched, record = kg.ZImageKGenProbe.execute(model, label).result
    return patched, record


def report(record, samples, **options):
    options.setdefault("save_history", False)
    image, text = kg.ZImageKGenReport.execute(record, {"samples": samples}, **options).result
    return image, json.loads(text)


def test_probe_does_not_change_the_result_and_counts_one_nfe_per_guided_evaluation(nano, dirs):
    model, cond, uncond = nano
    expected = sample(model, cond, uncond)  # cfg 4, batch 2: cond and uncond of both images in one evaluation
    patched, record = probe(model)
    out = sample(patched, cond, uncond)
    assert torch.equal(out, expected)
    assert len(model.get_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, kg.WRAPPER_KEY)) == 0
    image, r = report(record, out)
    assert r["nfe"] == 6 and r["planned_steps"] == 6 and r["completed"]
    assert r["label"] == "z-image-base" and r["batch"] == 2 and r["resolution"] == "128x128"
    # The run ends in a frozen record the report only reads, and nothing stays recording.
    assert isinstance(record.run, kg.RunRecord) and record.recording is None and len(record.run.times) == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.run.completed = False
    assert r["k_gen"] == pytest.approx(r["nfe"] / r["seconds"], rel=1e-3)
    assert r["times_s"] == sorted(r["times_s"]) and r["times_s"][0] > 0
    assert r["sigmas"][0] > r["sigmas"][-1]
    assert r["convergence"][0] == 0.0 and r["convergence"][-1] == pytest.approx(1.0, abs=1e-4)
    assert r["fit"]["points"] >= 2 and "slope" in r["fit"]
    assert r["temperature_c"] is None and "CPU" in r["telemetry_unavailable"]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 100
    saved = dirs / "output" / r["saved_to"]
    assert json.loads(saved.read_text(encoding="utf-8"))["k_gen"] == r["k_gen"]
    # The plot beside it, under the same name, is the image the node outputs.
    assert r["plot"] == r["saved_to"].removesuffix(".json") + ".png"
    plotted = np.asarray(Image.open(dirs / "output" / r["plot"]).convert("RGB"))
    assert plotted.shape == tuple(image.shape[1:])
    assert np.abs(plotted.astype(np.float32) - image[0].numpy() * 255).max() <= 1.0


def test_two_evaluations_per_step_samplers_count_both(nano, dirs):
    model, cond, uncond = nano
    patched, record = probe(model)
    out = sample(patched, cond, uncond, steps=4, cfg=1.0, batch=1, sampler="heun")
    _, r = report(record, out)
    assert r["nfe"] == 7  # heun: two evaluations per step, one on the last


def test_image_space_curve_and_the_pruning_patch_together(nano, dirs):
    model, cond, uncond = nano
    pruned = ea.patch_model(model, ea.PruneConfig(keep_ratio=0.5, calibration_steps=2))
    patched, record = probe(pruned, "nano base pruned")
    out = sample(patched, cond, uncond)
    _, r = report(record, out, image_space=True)
    assert r["label"] == "nano base pruned" and r["nfe"] == 6
    assert len(r["convergence_image"]) == 6 and r["convergence_image"][-1] == pytest.approx(1.0, abs=1e-4)
    assert ea.state_of(patched).report()["heads_pruned"] > 0


def test_one_step_run_reports_that_no_fit_is_possible(nano, dirs):
    model, cond, uncond = nano
    patched, record = probe(model)
    _, r = report(record, sample(patched, cond, uncond, steps=1))
    assert r["nfe"] == 1 and r["k_gen"] > 0
    assert "error" in r["fit"] and any("No fit" in m for m in r["messages"])


def test_interrupted_run_keeps_what_ran_and_says_so(nano, dirs):
    model, cond, uncond = nano
    patched, record = probe(model)

    def stop_after_three(step, *_):
        if step == 2:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(patched, cond, uncond, steps=6, callback=stop_after_three)
    _, r = report(record, torch.zeros(2, 16, 16, 16))
    assert not r["completed"] and r["nfe"] == 3 and r["planned_steps"] == 6
    assert any("did not finish" in m and "InterruptProcessingException" in m for m in r["messages"])
    out = sample(patched, cond, uncond)  # the next run is recorded afresh
    _, r = report(record, out)
    assert r["completed"] and r["nfe"] == 6


def test_samples_from_another_run_give_a_message_not_a_wrong_curve(nano, dirs):
    model, cond, uncond = nano
    patched, record = probe(model)
    sample(patched, cond, uncond, batch=2)
    _, r = report(record, torch.zeros(1, 16, 16, 16))
    assert "convergence" not in r and any("not the output of the probe's last run" in m for m in r["messages"])


def test_report_before_any_sampling_is_a_clear_error(nano):
    _, record = probe(nano[0])
    with pytest.raises(kg.KGenError, match="no sampling run"):
        report(record, torch.zeros(1, 16, 16, 16))


# ---------------------------------------------------------------------------------------------------
# History.

def test_history_appends_and_fits_arrhenius_over_three_temperatures(dirs):
    history = dirs / "user" / "zimage-kgen" / "history.jsonl"
    history.parent.mkdir(parents=True)
    rows = [{"label": "z-image-turbo", "device": "gpu", "resolution": "1024x1024", "batch": 1, "temperature_c": t,
             "k_gen": math.exp(9.8 - 1200 / (t + 273.15))} for t in (50.0, 60.0)]
    rows.append({"label": "z-image-base", "device": "gpu", "resolution": "1024x1024", "batch": 1, "temperature_c": 70.0,
                 "k_gen": 1.0})  # another model
    rows.append({"label": "z-image-turbo", "device": "gpu", "resolution": "1024x1024", "batch": 4, "temperature_c": 40.0,
                 "k_gen": 30.0})  # another batch size
    rows.append({"label": "z-image-turbo", "device": "gpu", "resolution": "1024x1024", "batch": 1, "temperature_c": "45",
                 "k_gen": "x"})  # hand-edited nonsense: kept in the file, left out of the fit
    history.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    t = 70.0
    report = {"label": "z-image-turbo", "device": "gpu", "resolution": "1024x1024", "batch": 1, "nfe": 8,
              "seconds": 1.0, "k_gen": math.exp(9.8 - 1200 / (t + 273.15)), "temperature_c": t, "messages": []}
    result, _ = kg.update_history(kg.DEFAULT_HISTORY, report)
    assert result["saved"] and result["runs"] == 6 and result["runs_same_key"] == 4
    assert result["arrhenius"]["n"] == 3
    assert result["arrhenius"]["ea_over_r_k"] == pytest.approx(1200, rel=1e-6)
    assert len(history.read_text(encoding="utf-8").splitlines()) == 6


def run_report(**overrides) -> dict:
    return {"label": "x", "device": "cpu", "resolution": "64x64", "batch": 1, "nfe": 2, "seconds": 0.5, "k_gen": 4.0,
            "messages": [], **overrides}


def test_lines_that_are_not_runs_are_skipped_and_the_file_is_never_moved(dirs):
    history = dirs / "user" / "zimage-kgen" / "history.jsonl"
    history.parent.mkdir(parents=True)
    history.write_text('{"k_gen": 1}\nnot json at all\n[1, 2]\n', encoding="utf-8")
    report = run_report()
    result, messages = kg.update_history(kg.DEFAULT_HISTORY, report)
    assert result["saved"] and result["runs"] == 2
    assert history.read_text(encoding="utf-8").startswith('{"k_gen": 1}\nnot json at all\n[1, 2]\n')
    assert sorted(p.name for p in history.parent.iterdir()) == ["history.jsonl"]
    assert any("2 line(s)" in m and "kept as it is" in m for m in messages)
    assert report == run_report()  # the report it was given is left as it was


def test_a_label_with_a_line_separator_reads_back_as_one_run(dirs):
    for label in ("a\u2028b", "c\u2029d\x85e", "汉服\u000b"):
        kg.update_history(kg.DEFAULT_HISTORY, run_report(label=label))
    result, messages = kg.update_history(kg.DEFAULT_HISTORY, run_report())
    assert result["saved"] and result["runs"] == 4 and not any("line(s)" in m for m in messages)
    entries, problem = kg.read_history(dirs / "user" / "zimage-kgen" / "history.jsonl")
    assert problem is None and [e["label"] for e in entries][:3] == ["a\u2028b", "c\u2029d\x85e", "汉服\u000b"]


@pytest.mark.parametrize("name", ["../escape.jsonl", "/etc/kgen.jsonl", "a/../../b.jsonl", "", "other-tool/runs.jsonl",
                                  "zimage-kgen/../other.jsonl", "zimage-kgen/a\0b.jsonl"])
def test_history_path_outside_the_user_directory_is_refused(dirs, name):
    report = {"label": "x", "device": "cpu", "resolution": "64x64", "batch": 1, "nfe": 2, "seconds": 0.5, "k_gen": 4.0,
              "messages": []}
    result, messages = kg.update_history(name, report)
    assert not result["saved"] and "outside the plugin's folder zimage-kgen/" in result["error"]
    assert messages == [result["error"]]
    assert not (dirs / "escape.jsonl").exists()


@pytest.mark.parametrize("name", ["default/comfy.settings.json", "zimage-kgen"])
def test_history_must_be_a_jsonl_file_so_other_user_files_are_never_moved_aside(dirs, name):
    settings = dirs / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text('{"Comfy.Locale": "zh"}', encoding="utf-8")
    (dirs / "user" / "zimage-kgen").mkdir()
    report = {"label": "x", "device": "cpu", "resolution": "64x64", "batch": 1, "nfe": 2, "seconds": 0.5, "k_gen": 4.0,
              "messages": []}
    result, _ = kg.update_history(name, report)
    assert not result["saved"] and ".jsonl" in result["error"]
    assert settings.read_text(encoding="utf-8") == '{"Comfy.Locale": "zh"}'


def test_a_prompt_with_c_text_zero_gives_the_slope_and_says_why_k_gen_is_missing():
    times = [0.1 * i for i in range(1, 8)]
    curve = [1 - 1 / (5.0 * t + 1) for t in times]
    fit = kin.kinetics_fit(times, curve, 0.0)
    assert fit["k_gen"] is None and fit["first_order"]["k_gen"] is None
    assert fit["k_gen_c_text"] == pytest.approx(5.0, rel=1e-6)
    assert "C_text is 0" in fit["note"] and "empty prompt" in fit["note"]


def test_non_finite_figures_become_null_so_the_json_stays_standard():
    report = kin.finite_figures({"k_gen": float("nan"), "fit": {"slope": float("inf"), "r2": 0.5},
                                "convergence": [0.1, float("-inf")], "messages": []})
    assert report["k_gen"] is None and report["fit"] == {"slope": None, "r2": 0.5}
    assert report["convergence"] == [0.1, None]
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert "3 figure(s) were not finite" in report["messages"][0]


@pytest.mark.parametrize("prefix", ["zimage-kgen/a\0b", "x" * 300])
def test_an_unusable_filename_prefix_is_a_message(dirs, prefix):
    with pytest.raises(kg.KGenError, match="not a usable file name"):
        kg.save_report(prefix, {"k_gen": 1.0}, torch.zeros(1, 8, 8, 3))


def test_summary_lines_write_a_negative_intercept_as_a_minus():
    report = {"k_gen": 2.50111, "label": "z-image-turbo", "device": "cpu", "resolution": "128x128", "batch": 1, "nfe": 9,
              "seconds": 3.598404, "fit": {"slope": 1.5, "intercept": -5.0744, "r2": 0.91, "k_gen_c_text": 1.5}}
    lines = kg.summary_lines(report)
    assert lines[0].endswith("9 NFE in 3.598 s, k_gen = 2.501 s⁻¹")
    assert "1.500·t − 5.074" in lines[1] and "+ -" not in lines[1]
