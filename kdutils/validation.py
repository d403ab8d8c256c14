"""Does knowledge quality pick the right teacher layers? The measurements of notebook 6.

A layer's *value* as a distillation target is measured inside the real recipe, so that it is not built from the
layer's depth: the student is trained CE-free (the `feature_kd` recipe) with the teacher's standard layers (one per
stage, paired with the student's k deepest standard layers), once as they are and once with teacher layer t swapped
into the slot of its own stage; the value of t is the paired change in validation accuracy (same seed, init and data
order), scored on a split held out from the training images (never the test split). A standard layer's value is 0
by construction. Spearman's rank correlation then says how well each score (S, I, E, sqrt(IE), Q, a linear probe,
depth) orders the layers by that value; predictors are compared by a bootstrap of the difference of their rhos, and
top-k selections by each score are trained under the same recipe and seeds and compared on the test split with
paired differences over seeds (kdutils.stats).

Called by notebook 6 (06_validate_kq: the sweep, the correlations, the selections and their summary) and the tests;
its runs go through kdutils.distill.distill.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from scipy import stats as sps

from kdutils.checkpoints import checkpoint_finished
from kdutils.data import Dataset
from kdutils.distill import REGISTRY, distill
from kdutils.feature_losses import distilled_network
from kdutils.feature_maps import one_to_one
from kdutils.kq import top_k  # noqa: F401  (notebook 6 imports it from here)
from kdutils.models import build_model
from kdutils.stats import paired_difference, verdict
from kdutils.teacher_cache import fill_targets

# Scores a layer can be ranked by: the paper's four (kdutils.kq), a linear probe and depth.
PREDICTORS = {"quality": "Q = S + sqrt(IE)", "separation": "S", "information": "I", "efficiency": "E",
              "sqrt_ie": "sqrt(IE)", "probe_acc": "linear probe", "depth": "depth"}
# KQ computed on other samples (notebook 6's memorisation test), by column name.
VIEWS = {"quality_train_small": "Q, training sample of the validation size", "quality_val": "Q, validation images",
         "separation_val": "S, validation images", "sqrt_ie_val": "sqrt(IE), validation images"}
BOOTSTRAP_METHOD = "percentile bootstrap over layers and, within each layer, seeds"
Q_RULE = "Q (the paper)"


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


def _fill_cache(teacher: nn.Module, student: str, data: Dataset, runs: Sequence[tuple[Sequence[int], Path | None]],
                student_layers: Sequence[int], recipe: dict, cache: dict) -> None:
    """One teacher pass for the targets of every run still to train ((teacher layers, checkpoint) pairs), instead of
    one per run: the sets overlap, and each would run the teacher over the data again (kdutils.teacher_cache)."""
    todo = [layers for layers, ck in runs if not checkpoint_finished(ck, recipe["epochs"])]
    if len(todo) < 2 or recipe.get("augment"):
        return
    unit = REGISTRY["feature_kd"].unit
    pairs = [unit.pairs(*one_to_one(student_layers, layers)) for layers in todo]
    with torch.device("meta"):           # the student only gives its layers' shapes: no weights drawn from the RNG
        net = build_model(student, data.num_classes, data.image_size)
    student_net = distilled_network(unit, net.to_empty(device="cpu"))
    fill_targets(teacher, student_net, data, unit.targets, [s for p in pairs for s in p[0]],
                 [t for p in pairs for t in p[1]], cache=cache, batch_size=recipe.get("batch_size", 128))


def stage_slot(layer: int, base: Sequence[int]) -> int:
    """The slot of `base` (sorted teacher layers, one per stage) that teacher layer `layer` belongs to: the first
    base layer at or after it, or the last slot for a layer beyond the deepest one."""
    return next((j for j, b in enumerate(base) if layer <= b), len(base) - 1)


def swapped(layer: int, base: Sequence[int]) -> list[int]:
    """`base` with the layer of `layer`'s stage replaced by `layer` (base itself for a base layer)."""
    out = list(base)
    out[stage_slot(layer, base)] = int(layer)
    return out


def swap_sweep(teacher: nn.Module, student: str, val_data: Dataset, layers: Sequence[int], base_layers: Sequence[int],
               student_layers: Sequence[int], seeds: Sequence[int], *, recipe: dict, cache: dict | None = None,
               checkpoint_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Each teacher layer's value in its stage's slot: per seed, one CE-free run with the pairs
    (student_layers <- base_layers) and one per layer t with t swapped into its stage's slot (swapped), trained on
    val_data's training split and scored on its test split (the validation images). `recipe` holds distill's epochs,
    lr, weight_decay, schedule, batch_size, augment. Runs are checkpointed in checkpoint_dir (base-seed{s}.pt,
    swap{t}-seed{s}.pt), so an interrupted sweep resumes. Returns one row per (layer, seed): its slot and layers,
    final and best validation accuracy, the base run's final accuracy and delta = val_final - base_final."""
    if len(base_layers) != len(student_layers):
        raise ValueError(f"the base set {list(base_layers)} and the student layers {list(student_layers)} must pair "
                         f"one to one; pass as many teacher standard layers as student layers (k).")
    cache = {} if cache is None else cache
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    ck = lambda name: folder / name if folder is not None else None  # noqa: E731
    runs = [(list(base_layers), ck(f"base-seed{seed}.pt")) for seed in seeds]
    runs += [(swapped(t, base_layers), ck(f"swap{t}-seed{seed}.pt")) for seed in seeds for t in layers
             if swapped(t, base_layers) != list(base_layers)]
    _fill_cache(teacher, student, val_data, runs, student_layers, recipe, cache)
    rows = []
    for seed in seeds:
        print(f"--- base: teacher layers {list(base_layers)} -> student layers {list(student_layers)}, seed {seed}",
              flush=True)
        base = _run(teacher, student, val_data, base_layers, student_layers, seed, ck(f"base-seed{seed}.pt"), recipe,
                    cache, progress)
        for t in layers:
            chosen = swapped(t, base_layers)
            if chosen == list(base_layers):
                history = base
            else:
                print(f"--- teacher layer {t} in slot {stage_slot(t, base_layers)}: {chosen}, seed {seed}", flush=True)
                history = _run(teacher, student, val_data, chosen, student_layers, seed, ck(f"swap{t}-seed{seed}.pt"),
                               recipe, cache, progress)
            final, base_final = history[-1]["test_acc"], base[-1]["test_acc"]
            rows.append({"layer": int(t), "seed": int(seed), "slot": stage_slot(t, base_layers), "teacher_layers": chosen,
                         "val_final": final, "val_best": max(h["test_acc"] for h in history),
                         "base_final": base_final, "delta": final - base_final})
    return pd.DataFrame(rows)


def layer_values(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per layer: its value (the mean paired change in final validation accuracy against the base set), the paired
    t interval of that change over seeds (NaN with one seed), its sample std, slot, mean accuracy and seeds."""
    rows = {}
    for t, g in sweep.groupby("layer"):
        d = paired_difference(list(g["val_final"]), list(g["base_final"]))
        nan = lambda v: float("nan") if v is None else v  # noqa: E731
        rows[int(t)] = {"value": d["mean_diff"], "low": nan(d["low"]), "high": nan(d["high"]),
                        "value_std": float(g["delta"].std()) if len(g) > 1 else float("nan"),
                        "slot": int(g["slot"].iloc[0]), "val_acc": float(g["val_final"].mean()), "seeds": len(g)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("layer")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


def _row_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of x (draws, layers) with the same row of y (average ranks for ties; NaN for a
    constant row)."""
    rx, ry = sps.rankdata(x, axis=1), sps.rankdata(y, axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _bootstrap(sweep: pd.DataFrame, scores: pd.DataFrame, predictors: list[str], n_boot: int,
               seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The layers' values and, per predictor, n_boot bootstrap rhos: layers resampled with replacement and, within
    each resampled layer, its seeds (both the choice of layers and the seed noise of their values). Every predictor
    sees the same draws, so differences of rhos are paired."""
    layers = sorted(sweep["layer"].unique())
    per_seed = np.stack([sweep.loc[sweep["layer"] == t].sort_values("seed")["delta"].to_numpy(dtype=float)
                         for t in layers])                                   # (layers, seeds)
    value = per_seed.mean(1)
    rng = np.random.default_rng(seed)
    n, s = per_seed.shape
    pick = rng.integers(0, n, (n_boot, n))
    seed_pick = rng.integers(0, s, (n_boot, n, s))
    v = per_seed[pick[..., None], seed_pick].mean(-1)                       # (draws, layers)
    table = scores.loc[layers, predictors].to_numpy(dtype=float)
    return value, {p: _row_spearman(table[pick, j], v) for j, p in enumerate(predictors)}


def _quantiles(d: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of the finite draws (NaN when there are none)."""
    d = d[np.isfinite(d)]
    if not d.size:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))


def rank_correlations(sweep: pd.DataFrame, scores: pd.DataFrame, predictors: Sequence[str] | None = None, *,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Spearman's rho between each layer's value (the mean paired change of swap_sweep) and each predictor column
    of `scores` (indexed by layer), with a percentile bootstrap interval (_bootstrap). With few layers the interval
    is wide: it is an honest statement of how little a handful of layers can show."""
    predictors = [p for p in (predictors or PREDICTORS) if p in scores.columns]
    value, draws = _bootstrap(sweep, scores, predictors, n_boot, seed)
    layers = sorted(sweep["layer"].unique())
    rows = []
    for p in predictors:
        low, high = _quantiles(draws[p], level)
        rows.append({"predictor": p, "score": {**PREDICTORS, **VIEWS}.get(p, p),
                     "spearman": spearman(scores.loc[layers, p], value), "ci_low": low, "ci_high": high,
                     "layers": len(layers)})
    return pd.DataFrame(rows).set_index("predictor")


def _rho_verdict(low: float, high: float, a: str, b: str) -> str:
    """What an interval for rho(a) - rho(b) allows one to say: a direction only when it excludes zero."""
    if np.isnan(low):
        return "no interval: cannot tell"
    if low > 0:
        return f"{a} orders the layers better than {b} (the interval excludes 0)"
    if high < 0:
        return f"{a} orders the layers worse than {b} (the interval excludes 0)"
    return "cannot tell (the interval includes 0)"


def predictor_differences(sweep: pd.DataFrame, scores: pd.DataFrame, against: str = "quality",
                          predictors: Sequence[str] | None = None, *, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> pd.DataFrame:
    """rho(against) - rho(p) for every other predictor p, with a paired percentile bootstrap interval (the same
    resampled layers and seeds for both rhos) and the verdict it allows: a direction only when the interval
    excludes zero."""
    predictors = [p for p in (predictors or PREDICTORS) if p in scores.columns]
    if against not in predictors:
        predictors = [against, *predictors]
    value, draws = _bootstrap(sweep, scores, predictors, n_boot, seed)
    layers = sorted(sweep["layer"].unique())
    rho = {p: spearman(scores.loc[layers, p], value) for p in predictors}
    names = {**PREDICTORS, **VIEWS}
    a = names.get(against, against)
    rows = []
    for p in predictors:
        if p == against:
            continue
        low, high = _quantiles(draws[against] - draws[p], level)
        diff = rho[against] - rho[p]
        said = ("undefined: a rho is undefined (a constant score or constant values)" if np.isnan(diff)
                else _rho_verdict(low, high, a, names.get(p, p)))
        rows.append({"predictor": p, "a": a, "b": names.get(p, p), "rho_a": rho[against], "rho_b": rho[p],
                     "diff": diff, "ci_low": low, "ci_high": high, "n_boot": n_boot, "method": BOOTSTRAP_METHOD,
                     "verdict": said})
    return pd.DataFrame(rows).set_index("predictor")


def compare_selections(teacher: nn.Module, student: str, data: Dataset, selections: dict[str, Sequence[int]],
                       student_layers: Sequence[int], seeds: Sequence[int], *, recipe: dict,
                       cache: dict | None = None, checkpoint_dir: str | Path | None = None,
                       progress: bool = True) -> pd.DataFrame:
    """Train each distinct layer selection CE-free (feature_kd's recipe, the same seeds) on data's training split
    and score it on the test split. Identical selections share one set of runs. Returns one row per selection:
    its layers, the names that chose them, final and best test accuracy (mean, sample std over seeds) and the
    per-seed final accuracies (final_acc, in seed order, for paired comparisons)."""
    cache = {} if cache is None else cache
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    distinct: dict[tuple[int, ...], list[str]] = {}
    for name, layers in selections.items():
        distinct.setdefault(tuple(sorted(int(t) for t in layers)), []).append(name)
    ck = lambda layers, seed: (folder / f"top{len(layers)}-{'-'.join(map(str, layers))}-seed{seed}.pt"  # noqa: E731
                               if folder is not None else None)
    _fill_cache(teacher, student, data, [(layers, ck(layers, seed)) for layers in distinct for seed in seeds],
                student_layers, recipe, cache)
    rows = []
    for layers, names in distinct.items():
        finals, bests = [], []
        for seed in seeds:
            print(f"--- teacher layers {list(layers)} ({', '.join(names)}), seed {seed}", flush=True)
            history = _run(teacher, student, data, layers, student_layers, seed, ck(layers, seed), recipe, cache,
                           progress)
            finals.append(history[-1]["test_acc"])
            bests.append(max(h["test_acc"] for h in history))
        rows.append({"layers": list(layers), "chosen by": ", ".join(names), "test_final": float(np.mean(finals)),
                     "test_final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan"),
                     "test_best": float(np.mean(bests)), "seeds": len(seeds), "final_acc": finals})
    return pd.DataFrame(rows)


def stagewise_best(values: pd.DataFrame, base: Sequence[int]) -> list[int]:
    """The validation oracle of the swap protocol: in every stage's slot, the layer of highest measured value (the
    base layer, value 0, when no swap beat it; ties go to the base layer, then the shallower one)."""
    out = []
    for j, b in enumerate(base):
        candidates = {int(t): float(v) for t, v in values.loc[values["slot"] == j, "value"].items()}
        candidates.setdefault(int(b), 0.0)
        out.append(max(candidates, key=lambda t: (candidates[t], t == b, -t)))
    return out


def selection_comparisons(compared: pd.DataFrame, against: str = Q_RULE) -> list[dict]:
    """Every other distinct selection against the one chosen by `against` (Q's): the paired difference over seeds
    of final test accuracy, in points, with its 95% interval and verdict (kdutils.stats)."""
    mine = compared[compared["chosen by"].str.split(", ").apply(lambda names: against in names)]
    if mine.empty:
        return []
    q = mine.iloc[0]
    out = []
    for _, r in compared.iterrows():
        if r["chosen by"] == q["chosen by"]:
            continue
        d = paired_difference([100 * v for v in r["final_acc"]], [100 * v for v in q["final_acc"]])
        out.append({"a": r["chosen by"], "b": q["chosen by"], "layers_a": list(r["layers"]),
                    "layers_b": list(q["layers"]), "points": d["mean_diff"], "low": d["low"], "high": d["high"],
                    "n_seeds": d["n_seeds"], "method": d["method"], "verdict": verdict(d, r["chosen by"], against)})
    return out


# Two selections (or predictors) tie when their means are equal to this tolerance (float sums over seeds).
TIE_TOLERANCE = 1e-9


def _undefined_rho(values: pd.DataFrame) -> str:
    """Why a Spearman correlation with the layer values is undefined (NaN): the values, or else the score, are
    constant over the swept layers."""
    v = values["value"].to_numpy(dtype=float)
    if len(v) and np.ptp(v) == 0:
        return "undefined: every swept layer has the same value, so there is no order to predict"
    return "undefined: the score is the same for every swept layer, so it orders none of them"


def _rho(row: "pd.Series | tuple", values: pd.DataFrame, interval: bool = True) -> str:
    """A correlation as printed: '+0.42 [-0.10, +0.80]' (or '+0.42'), or why it is undefined."""
    if np.isnan(row.spearman):
        return _undefined_rho(values)
    return f"{row.spearman:+.2f}" + (f" [{row.ci_low:+.2f}, {row.ci_high:+.2f}]" if interval else "")


def _points(v: float) -> str:
    """A change in accuracy as printed, in points."""
    return f"{100 * v:+.2f}"


def summary_lines(values: pd.DataFrame, correlations: pd.DataFrame, differences: pd.DataFrame,
                  held_correlations: pd.DataFrame, compared: pd.DataFrame, comparisons: list[dict],
                  rules: dict[str, Sequence[int]], *, seeds: int, held_out: bool) -> list[str]:
    """The sentences notebook 6 prints: the layers whose swap helps most, each predictor's rho, whether the
    bootstrap of the difference of rhos separates any predictor from Q, what KQ on unseen images changes, and how
    the selections compare with Q's on test (paired differences over seeds). A tie is a tie: a verdict is stated
    only when its interval excludes zero; an undefined (NaN) correlation says why."""
    lines = []
    ranked = values["value"].sort_values(ascending=False)
    if len(ranked) > 1 and np.ptp(ranked.to_numpy(dtype=float)) == 0:
        lines.append(f"Every swept teacher layer has the same value ({_points(ranked.iloc[0])} points against the "
                     f"standard layers, {seeds} seed(s)): this run cannot rank the layers (more epochs or a larger "
                     f"validation split may separate them).")
    else:
        lines.append(f"Largest values (change in validation accuracy when the layer replaces its stage's standard "
                     f"layer, points, {seeds} seed(s)): " +
                     ", ".join(f"{t} ({_points(v)})" for t, v in ranked.head(4).items()) +
                     f"; smallest: {ranked.index[-1]} ({_points(ranked.iloc[-1])}).")
    valid = correlations.dropna(subset=["spearman"])
    undefined = correlations[correlations["spearman"].isna()]
    if valid.empty:
        lines.append(f"Spearman's rho with the value is {_undefined_rho(values)} (every score's rho).")
    else:
        lines.append("Spearman's rho with the value: " + ", ".join(
            f"{row.score} {_rho(row, values)}" for row in valid.sort_values("spearman", ascending=False).itertuples())
            + (f"; {', '.join(undefined['score'])}: {_undefined_rho(values)}" if len(undefined) else "") + ".")
    if len(differences):
        lines.append("Q against each predictor, rho(Q) - rho(other) with its 95% bootstrap interval: " + "; ".join(
            f"{r.b}: undefined (a rho is undefined)" if np.isnan(r.diff) else
            f"{r.b} {r.diff:+.2f}" + ("" if np.isnan(r.ci_low) else f" [{r.ci_low:+.2f}, {r.ci_high:+.2f}]")
            + f" ({r.verdict})" for r in differences.itertuples()) + ".")
        better = [r.b for r in differences.itertuples() if "worse than" in r.verdict]
        worse = [r.b for r in differences.itertuples() if "better than" in r.verdict]
        if better:
            lines.append(f"Q orders this teacher's layers worse than {', '.join(better)}: the interval of the "
                         f"difference excludes 0 (a finding for this teacher and budget).")
        if worse:
            lines.append(f"Q orders this teacher's layers better than {', '.join(worse)} (the interval excludes 0).")
        if not better and not worse:
            lines.append("No predictor is separated from Q by this study: every interval of the difference "
                         "includes 0 (or is undefined), so it cannot say which orders the layers better.")
    if "quality_val" in held_correlations.index:
        small, unseen = held_correlations.loc["quality_train_small"], held_correlations.loc["quality_val"]
        where = "images the teacher never trained on" if held_out else "images the teacher trained on (val_fraction 0)"
        lines.append(f"KQ on the validation split ({where}): rho {_rho(unseen, values, False)} vs "
                     f"{_rho(small, values, False)} on a training sample of the same size; top-k "
                     f"{list(rules.get('Q on validation images', []))} vs {list(rules.get(Q_RULE, []))} on "
                     f"notebook 3's sample.")
    spread = lambda r: "" if np.isnan(r.test_final_std) else f" ± {r.test_final_std:.2%}"  # noqa: E731
    lines.append("Top-k selections on the test split (final epoch, mean" + (" ± std" if seeds > 1 else "") +
                 f" over {seeds} seed(s)): " + "; ".join(
                     f"{r['chosen by']} {r.layers}: {r.test_final:.2%}{spread(r)}"
                     for _, r in compared.sort_values("test_final", ascending=False).iterrows()) + ".")
    if len(compared) > 1 and np.ptp(compared["test_final"].to_numpy(dtype=float)) <= TIE_TOLERANCE:
        lines.append(f"Every selection scores the same ({compared['test_final'].iloc[0]:.2%}): a tie, so this run "
                     f"cannot tell the selections apart.")
    elif comparisons:
        lines.append("Each selection against Q's, paired over seeds (points of final test accuracy): " + "; ".join(
            f"{c['a']} {c['points']:+.2f}" + ("" if c["low"] is None else f" [{c['low']:+.2f}, {c['high']:+.2f}]")
            + f" ({c['verdict']})" for c in comparisons) + ".")
    elif len(compared) == 1:
        lines.append("Every rule chose the same layers: there is nothing to compare Q's selection with.")
    return lines


def results_block(values: pd.DataFrame, correlations: pd.DataFrame, differences: pd.DataFrame,
                  held_correlations: pd.DataFrame, compared: pd.DataFrame, comparisons: list[dict],
                  rules: dict[str, Sequence[int]], config: dict, base_layers: Sequence[int]) -> dict:
    """The `kq_validation` block of results.json: the protocol, per-layer values, correlations and their paired
    differences, selections, their accuracies and their paired comparisons with Q's."""
    clean = lambda v: None if isinstance(v, float) and np.isnan(v) else v  # noqa: E731
    table = lambda df: {str(i): {k: clean(v) for k, v in row.items()} for i, row in df.to_dict("index").items()}  # noqa: E731
    seeds = config["seeds"][:config.get("validation_seeds", len(config["seeds"]))]
    return {"protocol": "swap: a teacher layer replaces its stage's standard layer; value = paired change in final "
                        "validation accuracy", "base_layers": list(map(int, base_layers)),
            "seeds": list(seeds), "epochs": config["validation_epochs"], "k": config["k"],
            "val_fraction": config["val_fraction"], "layer_values": table(values),
            "correlations": table(correlations), "predictor_differences": table(differences),
            "held_out_correlations": table(held_correlations),
            "selections": {name: list(map(int, layers)) for name, layers in rules.items()},
            "selection_accuracy": [{k: clean(v) for k, v in row.items()} for row in compared.to_dict("records")],
            "comparisons": comparisons}
