"""Generation kinetics: the k_gen probe's figures from plain numbers, with no ComfyUI (numpy and math only).

A generation is read as a chemical reaction: the convergence I(t) of the intermediate predictions to the final
result follows dI/dt = k_gen·C_text·(1 − I), whose linearised form 1/(1 − I) = k_gen·C_text·t + 1 is fitted over
the intermediate predictions (and the first-order form ln(1/(1 − I)) beside it); t₁ is the first time I reaches a
threshold; ln k_gen = ln A − (E_a/R)/T is fitted across GPU temperatures from the runs of a history. The k_gen
probe (kgen_probe.py) records the runs and calls these; unit tests call them directly.
"""
from __future__ import annotations

import json
import math

import numpy as np

MIN_ARRHENIUS_TEMPERATURES = 3
# The last evaluation of a sampler that ends at sigma 0 predicts the final sample itself, off only by float
# rounding (1 − I ≈ 1e-9 there), and 1/(1 − I) would turn that rounding into the fit's whole slope.
FINAL_TOLERANCE = 1e-4


def convergence(predictions, final) -> list[float]:
    """I per evaluation: 1 − ‖x0_i − final‖ / ‖x0_0 − final‖, so I starts at 0 with the first prediction and
    reaches 1 when the prediction is the final result. (S, ...) and (...) -> S values; any arrays numpy reads
    (CPU tensors included), measured in float64."""
    predictions, final = np.asarray(predictions, dtype=np.float64), np.asarray(final, dtype=np.float64)
    d = np.array([np.sqrt(((p - final) ** 2).sum()) for p in predictions])
    if float(d[0]) == 0.0:
        return [1.0] * len(d)
    return (1.0 - d / d[0]).tolist()


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares y = slope·x + intercept: (slope, intercept, R²)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
    return float(slope), float(intercept), r2


def kinetics_fit(times, curve, c_text: float) -> dict:
    """Fit 1/(1 − I) = k_gen·C_text·t + b over the intermediate points (0 ≤ I < 1 − FINAL_TOLERANCE). Also the
    first-order form ln(1/(1 − I)) = k·C_text·t + b, which is what dI/dt = k·C_text·(1 − I) integrates to exactly.
    "line_points" holds the points the linearised fit was made on, [t, 1/(1 − I)], for the plot to draw those and
    no others."""
    points = [(t, i) for t, i in zip(times, curve, strict=True) if 0.0 <= i < 1.0 - FINAL_TOLERANCE]
    if len(points) < 2 or len({t for t, _ in points}) < 2:
        return {"points": len(points), "error": f"No fit: it needs at least 2 intermediate predictions (0 ≤ I < 1) "
                                                f"and this run has {len(points)}; sample more steps."}
    t = [p[0] for p in points]
    linearised = [1.0 / (1.0 - i) for _, i in points]
    slope, intercept, r2 = fit_line(t, linearised)
    slope1, intercept1, r2_1 = fit_line(t, [-math.log(1.0 - i) for _, i in points])
    # An empty prompt, or one weighted 0 throughout, has C_text 0: the slope is still k_gen·C_text, but k_gen is
    # not defined by it.
    def per_c_text(value):
        return value / c_text if c_text > 0 else None

    fit = {"points": len(points), "slope": slope, "intercept": intercept, "r2": r2,
           "k_gen_c_text": slope, "k_gen": per_c_text(slope),
           "first_order": {"slope": slope1, "intercept": intercept1, "r2": r2_1, "k_gen": per_c_text(slope1)},
           "line_points": [[float(x), y] for x, y in zip(t, linearised, strict=True)]}
    if not c_text > 0:
        fit["note"] = (f"C_text is {c_text:g} (an empty prompt, or every token weighted 0), so k_gen cannot be read "
                       "from the slope; k_gen·C_text is given.")
    return fit


def convergence_time(times, curve, threshold: float) -> float | None:
    """t₁: the first time I reaches the threshold (None if it never does)."""
    return next((float(t) for t, i in zip(times, curve, strict=True) if i >= threshold), None)


def arrhenius(points: list[tuple[float, float]]) -> dict:
    """Fit ln k = ln A − (E_a/R)/T over (temperature °C, k_gen) points, T in kelvin."""
    temps = {round(t, 1) for t, _ in points}
    if len(temps) < MIN_ARRHENIUS_TEMPERATURES:
        return {"n": len(points), "distinct_temperatures": len(temps),
                "error": f"Arrhenius needs runs at {MIN_ARRHENIUS_TEMPERATURES} or more distinct GPU temperatures; "
                         f"the history has {len(temps)} for this model, device, resolution and batch."}
    slope, intercept, r2 = fit_line([1.0 / (t + 273.15) for t, _ in points], [math.log(k) for _, k in points])
    return {"n": len(points), "distinct_temperatures": len(temps), "ea_over_r_k": -slope, "ln_a": intercept, "r2": r2}


# ---------------------------------------------------------------------------------------------------
# The history: one JSON object per line, one line per run.

def parse_history(text: str) -> tuple[list[dict], int]:
    """(the history's entries, how many lines are not JSON objects). JSON lines end at "\\n" only (a label may
    hold U+2028, which str.splitlines would split on)."""
    entries, bad = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            bad += 1
    return entries, bad


def history_key(entry: dict) -> tuple:
    """Runs are compared only with runs of the same model, device, resolution and batch."""
    return entry.get("label"), entry.get("device"), entry.get("resolution"), entry.get("batch")


def arrhenius_points(entries: list[dict], like: dict) -> list[tuple[float, float]]:
    """(temperature °C, k_gen) of the entries with like's key whose two figures are usable numbers (k_gen > 0);
    hand-edited or partial lines are left out."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return [(e["temperature_c"], e["k_gen"]) for e in entries if history_key(e) == history_key(like)
            and number(e.get("temperature_c")) and number(e.get("k_gen")) and e["k_gen"] > 0]


def finite_figures(report: dict) -> dict:
    """The report with every NaN or infinity given as null (and said so): the JSON stays standard, which browsers
    and other clients parse, where Python would write NaN and Infinity."""
    replaced = []

    def clean(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(path)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(report, "")
    if replaced:
        out.setdefault("messages", []).append(f"{len(replaced)} figure(s) were not finite (NaN or infinity), e.g. "
                                              f"{replaced[0]}, and are given as null.")
    return out
