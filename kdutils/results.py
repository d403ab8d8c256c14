"""Result tables, verdicts and summaries of a series' student runs: results.json and what is printed about it.

summarize_runs turns per-epoch histories into results.json's per-method block (final and best accuracy, mean and
sample std over seeds, curves, loss terms and monitor measurements) and its "comparisons"; results_markdown
tabulates it; verdicts and conflict_summary are the sentences notebook 5 prints (each method against CE and the two
effects of the CPU study, each a paired difference over seeds with a 95% interval from kdutils.stats; the measured
gradient conflict). Called by notebook 5, kdutils.pipeline (results.md after a run), kdutils.sweep_tasks and
kdutils.sweep (each combination's results), kdutils.report and benchmarks/cifar10_cpu.py.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from kdutils.distill import REGISTRY
from kdutils.stats import paired_difference, verdict

RESULTS_FILE = "results.json"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize_runs(runs: dict[str, list[list[dict]]], *, teacher: dict, preset: str, dataset: str,
                   precision: dict | None = None) -> dict:
    """Per-method final/best test accuracy (mean, sample std over runs), time per run and epochs to reach CE.

    `runs[method]` holds one per-epoch history (rows with epoch, loss, train_acc, test_acc, seconds) per seed. Per
    method: final = last epoch's test_acc, best = max over epochs, `seeds` = number of runs, `seconds` = mean total
    seconds per run, plus the per-run lists `final_acc`/`best_acc`, the mean test-accuracy curve `curve` and
    `epochs_to_ce_final`: the first epoch whose mean test accuracy reaches the CE student's final mean (None if never,
    or when there is no "ce" method). `precision` (kdutils.precision.record of what the runs trained in), if
    given, is kept as "precision". "comparisons" (:func:`comparisons`: paired differences over seeds with 95%
    intervals) is added when every method ran the same number of seeds, `runs` listing them in the same seed order.
    """
    methods = {}
    for method, histories in runs.items():
        if not histories or not all(histories):
            raise ValueError(f"method {method!r} has an empty run list or an empty history; pass one list of "
                             f"per-epoch rows per seed.")
        lengths = {len(h) for h in histories}
        if len(lengths) > 1:
            raise ValueError(f"method {method!r} has runs of different lengths {sorted(lengths)}; "
                             "summarize runs with the same number of epochs.")
        final = [h[-1]["test_acc"] for h in histories]
        best = [max(row["test_acc"] for row in h) for h in histories]
        final_mean, final_std = _mean_std(final)
        best_mean, best_std = _mean_std(best)
        methods[method] = {
            "label": REGISTRY[method].label if method in REGISTRY else method,
            **({"note": "evaluated as student + projector + the teacher's trainable tail"}
               if method in REGISTRY and REGISTRY[method].wraps_student else {}),
            "final_acc_mean": final_mean, "final_acc_std": final_std,
            "best_acc_mean": best_mean, "best_acc_std": best_std,
            "seeds": len(histories),
            "seconds": _mean_std([sum(row["seconds"] for row in h) for h in histories])[0],
            "final_acc": final, "best_acc": best,
            "epochs": [row["epoch"] for row in histories[0]],
            "params": histories[0][-1].get("params"),
            "curve": [_mean_std([h[i]["test_acc"] for h in histories])[0] for i in range(len(histories[0]))],
            **_training_curves(histories),
        }
    for summary in methods.values():
        summary["last_quarter_gain"] = last_quarter_gain(summary["curve"])
    target = methods["ce"]["final_acc_mean"] if "ce" in methods else None
    for summary in methods.values():
        reached = [e for e, acc in zip(summary["epochs"], summary["curve"]) if target is not None and acc >= target]
        summary["epochs_to_ce_final"] = reached[0] if reached else None
    out = {"preset": preset, "dataset": dataset,
           "teacher": {k: teacher[k] for k in ("model", "test_acc", "pretrained", "pretrained_requested")
                       if k in teacher}, **({"precision": precision} if precision is not None else {}),
           "methods": methods}
    if len({summary["seeds"] for summary in methods.values()}) == 1:
        out["comparisons"] = comparisons(out)          # paired over seeds: only when every method ran them all
    return out


# A run has reached its plateau when its mean test accuracy gains less than this over its last quarter of epochs.
PLATEAU_POINTS = 1.0


def quarter_epochs(epochs: int) -> int:
    """How many epochs the last quarter of a run holds (at least one)."""
    return max(1, epochs // 4)


def last_quarter_gain(curve: Sequence[float]) -> float | None:
    """Points of test accuracy gained over the last quarter of the epochs (quarter_epochs): curve[-1] minus the
    value at the epoch before that quarter began; None for a one-epoch curve."""
    if len(curve) < 2:
        return None
    return 100 * (curve[-1] - curve[-quarter_epochs(len(curve)) - 1])


def _nanmean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None/NaN (None when there are none)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else None


def _training_curves(histories: list[list[dict]]) -> dict:
    """Per-epoch means over seeds of the loss terms ("terms": {term: curve}) and, for runs recorded with
    distill(..., monitor=True), of the measurements ("monitor": grad_cosine {stage: curve}, feature_mse and
    feature_cka [pair][epoch]); epochs or seeds without them are skipped."""
    out: dict = {}
    epochs = range(len(histories[0]))
    terms = sorted({k for h in histories for row in h for k in row.get("terms", {})})
    if terms:
        out["terms"] = {k: [_nanmean([h[i].get("terms", {}).get(k) for h in histories]) for i in epochs]
                        for k in terms}
    rows = [[h[i].get("monitor") for h in histories] for i in epochs]
    if any(r is not None for per_epoch in rows for r in per_epoch):
        first = next(r for per_epoch in rows for r in per_epoch if r is not None)
        monitor: dict = {"seeds": sum(any(row.get("monitor") for row in h) for h in histories)}
        for key in ("feature_mse", "feature_cka"):
            monitor[key] = [[_nanmean([r[key][j] for r in per_epoch if r is not None]) for per_epoch in rows]
                            for j in range(len(first[key]))]
        if "grad_cosine" in first:
            monitor["grad_cosine"] = {stage: [_nanmean([r["grad_cosine"][stage] for r in per_epoch if r is not None])
                                              for per_epoch in rows] for stage in first["grad_cosine"]}
        out["monitor"] = monitor
    return out


# Pairs whose feature distances tell whether logit losses pull the features away from the teacher's: the same
# teacher layers and projectors, with and without CE (and KL) in the backbone.
CONFLICT_PAIRS = (("feature_kd", "feature_kd_ce"), ("standard_layers", "fitnets_kd_nokl"),
                  ("standard_layers", "fitnets_kd"))


def conflict_summary(results: dict) -> list[str]:
    """Sentences on the measured gradient conflict and feature distances of a run (methods trained with monitor):
    the mean cosine per stage over the second half of training, and the final-epoch distance to the teacher of
    each CE-free method against its counterpart with logit losses in the backbone."""
    m = results["methods"]
    lines = []
    for name, row in m.items():
        cos = row.get("monitor", {}).get("grad_cosine")
        if not cos:
            continue
        half = lambda c: _nanmean(c[len(c) // 2:])  # noqa: E731
        parts = ", ".join(f"{stage} {half(c):+.3f}" for stage, c in cos.items() if half(c) is not None)
        lines.append(f"- {name}: cosine between the backbone gradients of the logit terms and of the feature term, "
                     f"mean over the second half of training ({row['monitor']['seeds']} seed(s)): {parts}.")
    for free, logit in CONFLICT_PAIRS:
        a, b = m.get(free, {}).get("monitor"), m.get(logit, {}).get("monitor")
        if not a or not b:
            continue
        mse_a = [c[-1] for c in a["feature_mse"]]
        mse_b = [c[-1] for c in b["feature_mse"]]
        cka_a = [c[-1] for c in a["feature_cka"]]
        cka_b = [c[-1] for c in b["feature_cka"]]
        closer = sum(x < y for x, y in zip(mse_a, mse_b))
        lines.append(f"- {free} vs {logit} (same teacher layers), final epoch, per distilled layer: feature MSE "
                     f"{', '.join(f'{x:.3f}/{y:.3f}' for x, y in zip(mse_a, mse_b))}; linear CKA "
                     f"{', '.join(f'{x:.3f}/{y:.3f}' for x, y in zip(cka_a, cka_b))}. Without logit losses the "
                     f"student is closer to the teacher (lower MSE) at {closer} of {len(mse_a)} layers.")
    return lines or ["No run of this study was recorded with monitor=True (config key `monitor`)."]


def results_markdown(results: dict) -> str:
    """A Markdown table of summarize_runs output: accuracies in percent, gain over CE in points, teacher line."""
    methods = results["methods"]
    ce = methods.get("ce", {}).get("final_acc_mean")
    pct = lambda m, s, n: f"{100 * m:.2f} ± {100 * s:.2f}" if n > 1 else f"{100 * m:.2f} (1 seed)"  # noqa: E731
    teacher = results["teacher"]
    origin = ("" if "pretrained" not in teacher else " (ImageNet-pretrained, fine-tuned)" if teacher["pretrained"]
              else " (trained from scratch: the ImageNet weights it asked for were unavailable)"
              if teacher.get("pretrained_requested") else " (trained from scratch)")
    lines = [f"Preset `{results['preset']}`, dataset `{results['dataset']}`. Teacher `{teacher['model']}`{origin}: "
             f"{100 * teacher['test_acc']:.2f}% test accuracy.",
             "",
             "Test accuracy in %, mean ± sample std over seeds (no spread with one seed); final = last epoch "
             "(headline), best = best epoch (the paper's protocol). Gain over ce uses final accuracy, in points.",
             "",
             "| method | paper's name | final acc (%) | best acc (%) | gain over ce | epoch reaching ce final | seeds "
             "| parameters at test | seconds/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        gain = "" if ce is None or name == "ce" else f"{100 * (m['final_acc_mean'] - ce):+.2f}"
        reach = m.get("epochs_to_ce_final")
        label = m.get("label") or (REGISTRY[name].label if name in REGISTRY else name)
        lines.append(f"| {name} | {label} | {pct(m['final_acc_mean'], m['final_acc_std'], m['seeds'])} | "
                     f"{pct(m['best_acc_mean'], m['best_acc_std'], m['seeds'])} | {gain} | "
                     f"{'never' if reach is None else reach} | {m['seeds']} | "
                     f"{'' if m.get('params') is None else format(m['params'], ',')}{' *' if m.get('note') else ''} | "
                     f"{m['seconds']:.1f} |")
    notes = {m["note"] for m in methods.values() if m.get("note")}
    if notes:
        lines += ["", *(f"\\* {note}." for note in sorted(notes))]
    return "\n".join(lines) + "\n"


# The two effects the CPU study separates: which teacher layers (both CE-free), and CE in the backbone (same layers).
EFFECTS = (("feature_kd", "standard_layers", "layer choice: KQ layers instead of the standard ones (both CE-free)"),
           ("standard_layers", "fitnets_kd_nokl", "removing CE from the backbone, standard layers"),
           ("feature_kd", "feature_kd_ce", "removing CE from the backbone, KQ layers"))


def difference(results: dict, a: str, b: str) -> dict:
    """Final-accuracy difference a - b in points: the mean of the per-seed differences, its 95% paired t interval
    over seeds and the verdict it allows (kdutils.stats); a, b, n_seeds and the interval's method are kept."""
    ma, mb = results["methods"][a], results["methods"][b]
    d = paired_difference([100 * v for v in ma["final_acc"]], [100 * v for v in mb["final_acc"]])
    return {"a": a, "b": b, "points": d["mean_diff"], "low": d["low"], "high": d["high"], "n_seeds": d["n_seeds"],
            "method": d["method"], "verdict": verdict(d, a, b)}


def comparisons(results: dict, baseline: str = "ce") -> list[dict]:
    """Every comparison the course states about a run: each method against `baseline`, then the layer-choice and
    CE-removal effects (EFFECTS) whose methods ran; each a :func:`difference` (plus "what" for an effect)."""
    m = results["methods"]
    out = [difference(results, k, baseline) for k in m if k != baseline and baseline in m]
    out += [{**difference(results, a, b), "what": what} for a, b, what in EFFECTS if a in m and b in m]
    return out


def _interval(d: dict) -> str:
    """', 95% CI [low, high]' of a difference, or '' without an interval."""
    return "" if d["low"] is None else f", 95% CI [{d['low']:+.2f}, {d['high']:+.2f}]"


def verdicts(results: dict, baseline: str = "ce") -> list[str]:
    """The sentences notebook 5 prints about a run: ranking, teacher vs student, each method against `baseline`
    with its paired interval, and the layer-choice and CE-removal effects where their methods ran."""
    m, teacher = results["methods"], results["teacher"]
    order = sorted(m, key=lambda k: -m[k]["final_acc_mean"])
    seeds = min(row["seeds"] for row in m.values())
    lines = [f"Teacher {teacher['model']}: {teacher['test_acc']:.2%}. Ranking by final-epoch accuracy "
             f"({seeds} seed{'s' if seeds > 1 else ''}): " + ", ".join(f"{k} {m[k]['final_acc_mean']:.2%}"
                                                                        for k in order)]
    gain = m.get(baseline, {}).get("last_quarter_gain")
    if gain is not None:
        n = len(m[baseline]["curve"])
        state = (f"at its plateau (under {PLATEAU_POINTS:g} point)." if gain < PLATEAU_POINTS else
                 "still climbing, so this budget stops the students before they converge and the comparison says "
                 "little about converged students.")
        lines.append(f"The {baseline} student gained {gain:+.2f} points over its last {quarter_epochs(n)} of {n} "
                     f"epochs: {state}")
    if baseline in m and teacher["test_acc"] <= m[baseline]["final_acc_mean"]:
        lines.append(f"The teacher ({teacher['test_acc']:.2%}) is not better than the {baseline} student "
                     f"({m[baseline]['final_acc_mean']:.2%}): it has nothing to teach that the labels do not, so no "
                     f"distillation method can be expected to help in this run.")
    for k in order:
        if k != baseline and baseline in m:
            d = difference(results, k, baseline)
            lines.append(f"- {k}: {d['points']:+.2f} points vs {baseline}{_interval(d)}: {d['verdict']}")
    for a, b, what in EFFECTS:
        if a in m and b in m:
            d = difference(results, a, b)
            lines.append(f"Effect of {what}: {a} - {b} = {d['points']:+.2f} points{_interval(d)}: {d['verdict']}.")
    return lines
