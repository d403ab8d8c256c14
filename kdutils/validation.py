"""Does knowledge quality pick the right teacher layers? The measurements of notebook 6.

A layer's *value* as a distillation target is measured directly: the student is trained CE-free (the `feature_kd`
recipe) with one pair, its last distillation layer <- teacher layer t, and scored on a validation split held out
from the training images (never the test split). Spearman's rank correlation then says how well each score (S, I,
E, sqrt(IE), Q, a linear probe, depth) orders the layers by that value, and top-k selections by each score are
trained under the same recipe and seeds and compared on the test split.

Called by notebook 6 (06_validate_kq: the sweep, the correlations, the selections and their summary) and the tests;
its runs go through kdutils.distill.distill.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch.nn as nn
from scipy import stats

from kdutils.data import Dataset
from kdutils.distill import distill
from kdutils.kq import top_k  # noqa: F401  (notebook 6 imports it from here)

# Scores a layer can be ranked by: the paper's four (kdutils.kq), a linear probe and depth.
PREDICTORS = {"quality": "Q = S + sqrt(IE)", "separation": "S", "information": "I", "efficiency": "E",
              "sqrt_ie": "sqrt(IE)", "probe_acc": "linear probe", "depth": "depth"}
# KQ computed on other samples (notebook 6's memorisation test), by column name.
VIEWS = {"quality_train_small": "Q, training sample of the validation size", "quality_val": "Q, validation images",
         "separation_val": "S, validation images", "sqrt_ie_val": "sqrt(IE), validation images"}


def held_out_view(val: Dataset) -> Dataset:
    """The validation images as a training split (what KQ samples from), to compute KQ on images a teacher has not
    trained on; its test split is the same images (do not fit a probe on it)."""
    return dataclasses.replace(val, x_train=val.x_test, y_train=val.y_test)


def _run(teacher: nn.Module, student: str, data: Dataset, teacher_layers: Sequence[int], student_layers: Sequence[int],
         seed: int, checkpoint: Path | None, recipe: dict, cache: dict, progress: bool) -> list[dict]:
    """One CE-free student run (feature_kd's recipe) with the given layer pairs."""
    return distill(teacher, student, data, "feature_kd", teacher_layers=list(teacher_layers),
                   student_layers=list(student_layers), seed=seed, cache=cache, checkpoint=checkpoint,
                   progress=progress, **recipe)


def single_layer_sweep(teacher: nn.Module, student: str, val_data: Dataset, layers: Sequence[int],
                       student_layer: int, seeds: Sequence[int], *, recipe: dict, cache: dict | None = None,
                       checkpoint_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Each teacher layer's value as a target: for every layer t and seed, a CE-free student with the single pair
    (student_layer <- t), trained on val_data's training split and scored on its test split (the validation
    images). `recipe` holds distill's epochs, lr, weight_decay, schedule, batch_size, augment. Runs are
    checkpointed in checkpoint_dir (layer{t}-seed{s}.pt), so an interrupted sweep resumes. Returns one row per
    (layer, seed): final and best validation accuracy."""
    cache = {} if cache is None else cache
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        for t in layers:
            print(f"--- teacher layer {t} -> student layer {student_layer}, seed {seed}", flush=True)
            ck = folder / f"layer{t}-seed{seed}.pt" if folder is not None else None
            history = _run(teacher, student, val_data, [t], [student_layer], seed, ck, recipe, cache, progress)
            rows.append({"layer": int(t), "seed": int(seed), "val_final": history[-1]["test_acc"],
                         "val_best": max(h["test_acc"] for h in history)})
    return pd.DataFrame(rows)


def layer_values(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean and sample std over seeds of the final and best validation accuracy of the sweep."""
    grouped = sweep.groupby("layer")
    out = pd.DataFrame({"value": grouped["val_final"].mean(), "value_std": grouped["val_final"].std(),
                        "best": grouped["val_best"].mean(), "seeds": grouped.size()})
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def rank_correlations(sweep: pd.DataFrame, scores: pd.DataFrame, predictors: Sequence[str] | None = None, *,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Spearman's rho between each layer's value (mean final validation accuracy over seeds) and each predictor
    column of `scores` (indexed by layer), with a percentile bootstrap interval.

    The bootstrap resamples layers with replacement and, when the sweep has several seeds, each resampled layer's
    seeds too (a two-level bootstrap: both the choice of layers and the seed noise of their values). With few
    layers the interval is wide: it is an honest statement of how little a handful of layers can show.
    """
    predictors = [p for p in (predictors or PREDICTORS) if p in scores.columns]
    layers = sorted(sweep["layer"].unique())
    per_layer = {t: sweep.loc[sweep["layer"] == t, "val_final"].to_numpy(dtype=float) for t in layers}
    value = np.array([per_layer[t].mean() for t in layers])
    table = scores.loc[layers, predictors].astype(float)
    rng = np.random.default_rng(seed)
    draws = {p: [] for p in predictors}
    for _ in range(n_boot):
        pick = rng.integers(0, len(layers), len(layers))
        v = np.array([rng.choice(per_layer[layers[i]], len(per_layer[layers[i]])).mean() for i in pick])
        for p in predictors:
            rho = spearman(table[p].to_numpy()[pick], v)
            if not np.isnan(rho):
                draws[p].append(rho)
    alpha = (1 - level) / 2
    rows = []
    for p in predictors:
        d = np.asarray(draws[p])
        rows.append({"predictor": p, "score": {**PREDICTORS, **VIEWS}.get(p, p), "spearman": spearman(table[p], value),
                     "ci_low": float(np.quantile(d, alpha)) if d.size else float("nan"),
                     "ci_high": float(np.quantile(d, 1 - alpha)) if d.size else float("nan"),
                     "layers": len(layers)})
    return pd.DataFrame(rows).set_index("predictor")


def compare_selections(teacher: nn.Module, student: str, data: Dataset, selections: dict[str, Sequence[int]],
                       student_layers: Sequence[int], seeds: Sequence[int], *, recipe: dict,
                       cache: dict | None = None, checkpoint_dir: str | Path | None = None,
                       progress: bool = True) -> pd.DataFrame:
    """Train each distinct layer selection CE-free (feature_kd's recipe, the same seeds) on data's training split
    and score it on the test split. Identical selections share one set of runs. Returns one row per selection:
    its layers, the names that chose them, final and best test accuracy (mean, sample std over seeds)."""
    cache = {} if cache is None else cache
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    distinct: dict[tuple[int, ...], list[str]] = {}
    for name, layers in selections.items():
        distinct.setdefault(tuple(sorted(int(t) for t in layers)), []).append(name)
    rows = []
    for layers, names in distinct.items():
        finals, bests = [], []
        for seed in seeds:
            print(f"--- teacher layers {list(layers)} ({', '.join(names)}), seed {seed}", flush=True)
            tag = "-".join(map(str, layers))
            ck = folder / f"top{len(layers)}-{tag}-seed{seed}.pt" if folder is not None else None
            history = _run(teacher, student, data, layers, student_layers, seed, ck, recipe, cache, progress)
            finals.append(history[-1]["test_acc"])
            bests.append(max(h["test_acc"] for h in history))
        rows.append({"layers": list(layers), "chosen by": ", ".join(names), "test_final": float(np.mean(finals)),
                     "test_final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan"),
                     "test_best": float(np.mean(bests)), "seeds": len(seeds), "final_acc": finals})
    return pd.DataFrame(rows)


# Two selections (or predictors) tie when their means are equal to this tolerance (float sums over seeds).
TIE_TOLERANCE = 1e-9


def _undefined_rho(values: pd.DataFrame) -> str:
    """Why a Spearman correlation with the layer values is undefined (NaN): the values, or else the score, are
    constant over the swept layers."""
    v = values["value"].to_numpy(dtype=float)
    if len(v) and np.ptp(v) == 0:
        return f"undefined: every swept layer has the same value ({v[0]:.2%}), so there is no order to predict"
    return "undefined: the score is the same for every swept layer, so it orders none of them"


def _rho(row: "pd.Series | tuple", values: pd.DataFrame, interval: bool = True) -> str:
    """A correlation as printed: '+0.42 [-0.10, +0.80]' (or '+0.42'), or why it is undefined."""
    if np.isnan(row.spearman):
        return _undefined_rho(values)
    return f"{row.spearman:+.2f}" + (f" [{row.ci_low:+.2f}, {row.ci_high:+.2f}]" if interval else "")


def summary_lines(values: pd.DataFrame, correlations: pd.DataFrame, held_correlations: pd.DataFrame,
                  compared: pd.DataFrame, rules: dict[str, Sequence[int]], *, seeds: int, held_out: bool) -> list[str]:
    """The sentences notebook 6 prints: the most valuable layers, which predictor orders them best (and whether the
    intervals separate it from Q), what KQ on unseen images changes, and how the selections compare on test.

    A tie is a tie: selections (or predictors) whose means are equal (to TIE_TOLERANCE) tie, and none of them is
    called the best; a gap within the seed spread is reported as such. An undefined (NaN) correlation says why:
    the layer values, or the score, are constant over the swept layers.
    """
    lines = []
    ranked = values["value"].sort_values(ascending=False)
    if len(ranked) > 1 and np.ptp(ranked.to_numpy(dtype=float)) == 0:
        lines.append(f"Every swept teacher layer has the same value ({ranked.iloc[0]:.2%} validation accuracy, "
                     f"{seeds} seed(s)): this run cannot rank the layers (more epochs or a larger validation split "
                     f"may separate them).")
    else:
        lines.append(f"Most valuable single teacher layers (validation accuracy, {seeds} seed(s)): " +
                     ", ".join(f"{t} ({v:.2%})" for t, v in ranked.head(4).items()) +
                     f"; least: {ranked.index[-1]} ({ranked.iloc[-1]:.2%}).")
    valid = correlations.dropna(subset=["spearman"])
    undefined = correlations[correlations["spearman"].isna()]
    q = correlations.loc["quality"] if "quality" in correlations.index else None
    if valid.empty:
        lines.append(f"Spearman's rho with the value is {_undefined_rho(values)} (every score's rho).")
    else:
        lines.append("Spearman's rho with the value: " + ", ".join(
            f"{row.score} {_rho(row, values)}" for row in valid.sort_values("spearman", ascending=False).itertuples())
            + (f"; {', '.join(undefined['score'])}: {_undefined_rho(values)}" if len(undefined) else "") + ".")
        top = valid["spearman"].max()
        leaders = valid[np.isclose(valid["spearman"], top, rtol=0, atol=TIE_TOLERANCE)]
        if q is None or np.isnan(q.spearman):
            pass                                   # Q's line above says why it has no rho
        elif "quality" not in leaders.index:
            b = correlations.loc[valid["spearman"].idxmax()]
            apart = b.ci_low > q.spearman or q.ci_high < b.spearman
            lines.append(f"Here {b.score} orders the layers better than Q ({b.spearman:+.2f} vs {q.spearman:+.2f}); "
                         + ("its interval lies clear of Q's estimate: a finding for this teacher and budget, to be "
                            "checked at the paper's scale." if apart else
                            "the intervals overlap, so this study cannot tell the two apart."))
        elif len(leaders) > 1:
            others = ", ".join(s for p, s in leaders["score"].items() if p != "quality")
            lines.append(f"Q ties with {others} as the best predictor here (rho {q.spearman:+.2f} each).")
        else:
            lines.append(f"Q is the best predictor here ({q.spearman:+.2f}).")
    if "quality_val" in held_correlations.index:
        small, unseen = held_correlations.loc["quality_train_small"], held_correlations.loc["quality_val"]
        where = "images the teacher never trained on" if held_out else "images the teacher trained on (val_fraction 0)"
        lines.append(f"KQ on the validation split ({where}): rho {_rho(unseen, values, False)} vs "
                     f"{_rho(small, values, False)} on a training sample of the same size; top-k "
                     f"{list(rules.get('Q on validation images', []))} vs {list(rules.get('Q (the paper)', []))} on "
                     f"notebook 3's sample.")
    spread = lambda r: "" if np.isnan(r.test_final_std) else f" ± {r.test_final_std:.2%}"  # noqa: E731
    lines.append("Top-k selections on the test split (final epoch): " + "; ".join(
        f"{r['chosen by']} {r.layers}: {r.test_final:.2%}{spread(r)}"
        for _, r in compared.sort_values("test_final", ascending=False).iterrows()) + ".")
    q_row = compared[compared["chosen by"].str.contains("Q \\(the paper\\)", regex=True)]
    if not q_row.empty:
        lines.append(_selection_verdict(compared, q_row.iloc[0], seeds))
    return lines


def _selection_verdict(compared: pd.DataFrame, q: pd.Series, seeds: int) -> str:
    """How Q's selection compares with the others on test: best, tied (equal means), or beaten, and whether the
    gap exceeds the seed spread (the larger sample std of the two)."""
    best_acc = compared["test_final"].max()
    tied = compared[np.isclose(compared["test_final"], best_acc, rtol=0, atol=TIE_TOLERANCE)]
    noise = lambda a, b: 100 * max(np.nan_to_num(a.test_final_std), np.nan_to_num(b.test_final_std))  # noqa: E731
    judged = lambda gap, a, b: (" (one seed: no spread to judge it)" if seeds < 2 else  # noqa: E731
                                f", {'more' if gap > noise(a, b) else 'less'} than the seed spread "
                                f"({noise(a, b):.2f})")
    if len(compared) > 1 and len(tied) == len(compared):
        return (f"Every selection scores the same ({best_acc:.2%}): a tie (equal mean final test accuracy), so this "
                f"run cannot tell the selections apart.")
    if not np.isclose(q.test_final, best_acc, rtol=0, atol=TIE_TOLERANCE):
        best = compared.loc[compared["test_final"].idxmax()]
        gap = 100 * (best.test_final - q.test_final)
        return f"The best selection ({best['chosen by']}) beats Q's by {gap:.2f} points" + judged(gap, best, q) + "."
    if len(tied) > 1:
        others = "; ".join(r["chosen by"] for _, r in tied.iterrows() if r["chosen by"] != q["chosen by"])
        return (f"Q's selection ties for the best with {others} ({best_acc:.2%} each: equal mean final test "
                f"accuracy), so it is not the best one alone.")
    if len(compared) == 1:
        return f"Q's selection is the only distinct one ({q['chosen by']}): there is nothing to compare it with."
    runner_up = compared.drop(index=q.name).sort_values("test_final", ascending=False).iloc[0]
    gap = 100 * (q.test_final - runner_up.test_final)
    return (f"Q's selection is the best one, {gap:.2f} points ahead of {runner_up['chosen by']}"
            + judged(gap, q, runner_up) + ".")


def results_block(values: pd.DataFrame, correlations: pd.DataFrame, held_correlations: pd.DataFrame,
                  compared: pd.DataFrame, rules: dict[str, Sequence[int]], config: dict) -> dict:
    """The `kq_validation` block of results.json: per-layer values, correlations, selections and their accuracies."""
    clean = lambda v: None if isinstance(v, float) and np.isnan(v) else v  # noqa: E731
    table = lambda df: {str(i): {k: clean(v) for k, v in row.items()} for i, row in df.to_dict("index").items()}  # noqa: E731
    seeds = config["seeds"][:config.get("validation_seeds", len(config["seeds"]))]
    return {"seeds": list(seeds), "epochs": config["validation_epochs"], "k": config["k"],
            "val_fraction": config["val_fraction"], "layer_values": table(values),
            "correlations": table(correlations), "held_out_correlations": table(held_correlations),
            "selections": {name: list(map(int, layers)) for name, layers in rules.items()},
            "selection_accuracy": [{k: clean(v) for k, v in row.items()} for row in compared.to_dict("records")]}
