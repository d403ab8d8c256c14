"""Figures of trained runs' results (results.json of kdutils.results.summarize_runs, and notebook 6's sweep): the
paper's result panel and grid with the average relative improvement (ARI), gains over the CE student, accuracy
curves, the monitor's gradient-conflict and feature-distance curves, and whether KQ orders the layers by value.

Called by notebook 5 (result panel, accuracy curves, monitor figures), notebook 6 (plot_value_vs_score,
plot_rank_correlations), kdutils.report (a run's figures) and kdutils.sweep (plot_result_grid per dataset). Every
function returns a matplotlib Figure built without pyplot; kdutils.plots holds the KQ, geometry and training figures.
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, MaxNLocator

from kdutils.distill import REGISTRY
from kdutils.plots import KQ_STYLE, plain_log_ticks


# ------------------------------------------------------------------------------------------------------------------
# gains over the CE student, as plain bars

def plot_gains(results: dict, *, baseline: str = "ce", title: str | None = None) -> Figure:
    """Horizontal bars: each method's mean final-epoch accuracy minus the baseline's, in points, +-1 std over seeds;
    the teacher's accuracy in a text box (the layout of the paper's result figure, with final-epoch accuracy)."""
    methods = results["methods"]
    if baseline not in methods:
        raise ValueError(f"results have no {baseline!r} run to compare against; include it in `methods`.")
    base = methods[baseline]["final_acc_mean"]
    names = [m for m in methods if m != baseline]
    gains = [100 * (methods[m]["final_acc_mean"] - base) for m in names]
    errors = [100 * methods[m]["final_acc_std"] for m in names]
    fig = Figure(figsize=(7, 0.5 * len(names) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    colours = ["tab:green" if g > 0 else "tab:red" for g in gains]
    ax.barh(names, gains, xerr=errors, color=colours, alpha=0.8, capsize=3)
    ax.axvline(0, color="black", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel(f"final-epoch test accuracy minus {baseline} ({100 * base:.2f}%), points")
    ax.grid(axis="x", alpha=0.3)
    teacher = results.get("teacher", {})
    if "test_acc" in teacher:
        ax.text(0.99, 0.02, f"teacher {teacher.get('model', '')}: {100 * teacher['test_acc']:.2f}%",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.set_title(title or f"Gain over the {baseline} student")
    return fig


# ------------------------------------------------------------------------------------------------------------------
# the paper's result figures (METHOD.md section 8), drawn from summarize_runs output (results.json)

ARI_BASELINES = ("hinton_kd", "hinton_kd_std", "fitnets_kd", "fitnets_fc_kd", "sp_kd", "simkd", "semckd")
"""The paper's main comparison (Van. KD, Van. KD Std., Base FKD, Base FKD+FC, Sim. Pres., SimKD, SemCKD): the
baselines that the average relative improvement (ARI) is taken over."""

OURS_ABLATIONS = ("standard_layers",)
"""Ablations of ours whose names do not start with ours + "_" (those, e.g. feature_kd_ce, count as ablations too)."""

ARI_MIN_GAIN = 0.5       # points: a baseline enters the ARI only when it gains at least this much over the student
ARI_STABLE_BELOW = 15.0  # the ARI is printed only when 0 < ARI < 15 (1500%), else "Unstable" (as the paper)
ERROR_CLIP = 2.0         # points: error bars show the std over seeds clipped at 2 (as the paper)
GROUP_STYLE = {          # group: (legend label, face colour, edge colour, hatch)
    "ours": ("ours", "#c0392b", "black", None),
    "ablation": ("ablations of ours", "#f5b7b1", "#c0392b", "//"),
    "baseline": ("baselines", "#5d7ea8", "#34495e", None),
}
_NOTE_MARKS = ("\u2020", "\u2021", "\u00a7", "\u00b6")  # dagger, double dagger, section, pilcrow


def _metric_keys(metric: str) -> tuple[str, str]:
    """The mean and std keys of summarize_runs for metric "final" or "best"."""
    if metric not in ("final", "best"):
        raise ValueError(f"metric must be 'final' (final epoch) or 'best' (best epoch), not {metric!r}.")
    return f"{metric}_acc_mean", f"{metric}_acc_std"


def _require(methods: dict, name: str, role: str) -> dict:
    """methods[name], or a ValueError naming the methods that are there."""
    if name not in methods:
        raise ValueError(f"results have no {name!r} run to use as the {role}; they hold: {', '.join(methods)}.")
    return methods[name]


def _label(methods: dict, name: str) -> str:
    """A method's display name: its "label" (e.g. the paper's "Van. KD") or its key."""
    return str(methods[name].get("label", name))


def _gain(methods: dict, name: str, baseline: str, metric: str) -> float:
    """Mean accuracy of `name` minus the baseline's, in points."""
    mean, _ = _metric_keys(metric)
    return 100.0 * (methods[name][mean] - methods[baseline][mean])


def method_group(name: str, ours: str = "feature_kd") -> str:
    """"ours", "ablation" (ours + "_..." or one of OURS_ABLATIONS) or "baseline"."""
    if name == ours:
        return "ours"
    return "ablation" if name.startswith(ours + "_") or name in OURS_ABLATIONS else "baseline"


def _ari_terms(results: dict, ours: str, baseline: str, metric: str,
               baselines: Sequence[str]) -> list[tuple[str, float]]:
    """(baseline, gain of ours / its gain) for the present baselines gaining >= ARI_MIN_GAIN points."""
    methods = results["methods"]
    _require(methods, baseline, "student baseline")
    _require(methods, ours, "method of the ARI (ours)")
    g_ours = _gain(methods, ours, baseline, metric)
    return [(b, g_ours / g) for b in baselines if b in methods and b not in (ours, baseline)
            for g in [_gain(methods, b, baseline, metric)] if g >= ARI_MIN_GAIN]


def average_relative_improvement(results: dict, *, ours: str = "feature_kd", baseline: str = "ce",
                                 metric: str = "final", baselines: Sequence[str] = ARI_BASELINES) -> float | None:
    """The paper's ARI: mean over `baselines` gaining >= 0.5 points over the student of (gain of ours / their gain),
    as a ratio (1.25 = 125%); None when no baseline qualifies."""
    terms = _ari_terms(results, ours, baseline, metric, baselines)
    return float(np.mean([r for _, r in terms])) if terms else None


def ari_text(results: dict, *, ours: str = "feature_kd", baseline: str = "ce", metric: str = "final",
             baselines: Sequence[str] = ARI_BASELINES) -> str:
    """The ARI line of the result box: "ARI: 125% (vs ...)", "ARI: Unstable (...)" or why there is none."""
    methods = results["methods"]
    if ours not in methods:
        return f"ARI: n/a (no {ours} run)"
    terms = _ari_terms(results, ours, baseline, metric, baselines)
    if not terms:
        return f"ARI: no baseline gains >= {ARI_MIN_GAIN} pt"
    ari = float(np.mean([r for _, r in terms]))
    over = ", ".join(_label(methods, b) for b, _ in terms)
    if 0 < ari < ARI_STABLE_BELOW:
        return f"ARI: {100 * ari:.0f}% (vs {over})"
    return f"ARI: Unstable ({100 * ari:.0f}% vs {over})"


def _teacher_text(results: dict) -> str:
    """One line: the teacher, whether it was ImageNet-pretrained, and its test accuracy."""
    teacher = results.get("teacher", {})
    pretrained = teacher.get("pretrained")
    origin = ("pretraining not recorded" if pretrained is None else "ImageNet-pretrained" if pretrained
              else "from scratch, pretrained weights unavailable" if teacher.get("pretrained_requested")
              else "from scratch")
    acc = f"{100 * teacher['test_acc']:.2f}%" if "test_acc" in teacher else "accuracy not recorded"
    return f"teacher {teacher.get('model', '?')} ({origin}): {acc}"


def _draw_result_panel(ax: Axes, results: dict, baseline: str, ours: str, metric: str,
                       title: str | None) -> tuple[Axes, list[tuple[Text, float]], Legend, int]:
    """Draw the bars, labels and box of one result panel; return what _fit_result_panels needs."""
    mean_key, std_key = _metric_keys(metric)
    methods = results["methods"]
    base = _require(methods, baseline, "student baseline")
    order = {"ours": 0, "ablation": 1, "baseline": 2}
    names = sorted((m for m in methods if m != baseline), key=lambda m: order[method_group(m, ours)])
    marks, notes = {}, []
    for m in names:
        if methods[m].get("note"):
            mark = _NOTE_MARKS[len(notes)] if len(notes) < len(_NOTE_MARKS) else f"[{len(notes) + 1}]"
            marks[m] = mark
            notes.append(f"{mark} {_label(methods, m)}: {methods[m]['note']}")
    y = np.arange(len(names))
    gains = np.array([_gain(methods, m, baseline, metric) for m in names])
    stds = np.array([100 * methods[m][std_key] for m in names])
    multi = np.array([methods[m].get("seeds", 1) > 1 for m in names], dtype=bool)
    errs = np.where(multi, np.minimum(stds, ERROR_CLIP), 0.0)
    groups = [method_group(m, ours) for m in names]
    for i, (m, g) in enumerate(zip(names, groups)):
        _, face, edge, hatch = GROUP_STYLE[g]
        ax.barh(y[i], gains[i], height=0.7, color=face, edgecolor=edge, hatch=hatch, lw=1.2 if g == "ours" else 0.8,
                zorder=2)
    if multi.any():
        ax.errorbar(gains[multi], y[multi], xerr=errs[multi], fmt="none", ecolor="black", elinewidth=1, capsize=3,
                    zorder=3, gid="seed_std")
    ax.axvline(0, color="black", lw=1, zorder=4)
    texts = []
    for i, m in enumerate(names):
        right = gains[i] >= 0
        end = gains[i] + errs[i] if right else gains[i] - errs[i]
        value = f"{gains[i]:+.2f} \u00b1 {stds[i]:.2f}" if multi[i] else f"{gains[i]:+.2f} (1 seed)"
        t = ax.annotate(value, (end, y[i]), xytext=(3 if right else -3, 0), textcoords="offset points",
                        ha="left" if right else "right", va="center", fontsize=8, annotation_clip=False)
        texts.append((t, float(end)))
    ax.set_yticks(y, [_label(methods, m) + marks.get(m, "") for m in names])
    for tick, g in zip(ax.get_yticklabels(), groups):
        if g == "ours":
            tick.set_fontweight("bold")
    ax.set_ylim(max(len(names), 1) - 0.5, -0.5)  # first method on top
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}" if v else "0"))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(axis="x", alpha=0.3, zorder=0)
    ax.set_xlabel(f"{metric}-epoch test accuracy minus {_label(methods, baseline)}, points")
    ax.set_title(title or f"{results.get('dataset', '')}: accuracy gain over {_label(methods, baseline)} "
                          f"({metric} epoch)", fontsize=10)
    lines = [_teacher_text(results),
             f"{_label(methods, baseline)}{'' if _label(methods, baseline) == baseline else f' ({baseline})'}: "
             f"{100 * base[mean_key]:.2f} \u00b1 {100 * base[std_key]:.2f}% "
             f"({base.get('seeds', 1)} seed{'s' if base.get('seeds', 1) != 1 else ''})",
             f"error bars: std over seeds, clipped at {ERROR_CLIP:g} pt",
             *textwrap.wrap(ari_text(results, ours=ours, baseline=baseline, metric=metric), 60,
                            subsequent_indent="    "),
             *[w for n in notes for w in textwrap.wrap(n, 60, subsequent_indent="    ")]]
    present = [g for g in GROUP_STYLE if g in groups]
    handles = [Patch(facecolor=GROUP_STYLE[g][1], edgecolor=GROUP_STYLE[g][2], hatch=GROUP_STYLE[g][3],
                     label=GROUP_STYLE[g][0]) for g in present]
    box = ax.legend(handles=handles, title="\n".join(lines), loc="lower right", fontsize=7, title_fontsize=7,
                    alignment="left", framealpha=0.95, ncols=max(1, len(handles)))
    return ax, texts, box, len(names)


def _fit_result_panels(fig: Figure, panels: Sequence[tuple[Axes, list[tuple[Text, float]], Legend, int]],
                       passes: int = 3) -> None:
    """Set each panel's x-range so that 0, the bars, error bars and value labels fit inside with no overlap, and its
    y-range so that the box below the last bar never covers a bar (measured on the drawn figure)."""
    for _ in range(passes):
        fig.draw_without_rendering()
        pad, gap = 6 * fig.dpi / 72, 6 * fig.dpi / 72  # 6 points, in pixels (text widths vary a little with dpi)
        for ax, texts, box, n in panels:
            bbox = ax.get_window_extent()
            width, height = bbox.width, bbox.height
            ends = [0.0] + [e for _, e in texts]
            lo0, hi0 = min(ends), max(ends)
            margin = max(0.05 * (hi0 - lo0), 0.25)
            lo0, hi0 = lo0 - margin, hi0 + margin
            offsets = []
            for t, anchor in texts:
                ext = t.get_window_extent()
                a_px = ax.transData.transform((anchor, 0))[0]
                offsets.append((anchor, 1.04 * (ext.x0 - a_px) - pad, 1.04 * (ext.x1 - a_px) + pad))

            def span(s: float) -> tuple[float, float]:
                """The x-range needed at s data units per pixel."""
                lo = min([lo0] + [a + left * s for a, left, _ in offsets])
                hi = max([hi0] + [a + right * s for a, _, right in offsets])
                return lo, hi

            s_lo = (hi0 - lo0) / width
            s_hi = s_lo
            for _ in range(40):
                lo, hi = span(s_hi)
                if hi - lo <= s_hi * width:
                    break
                s_hi *= 2
            for _ in range(50):  # bisection for the smallest scale at which everything fits
                s_mid = 0.5 * (s_lo + s_hi)
                lo, hi = span(s_mid)
                s_lo, s_hi = (s_mid, s_hi) if hi - lo > s_mid * width else (s_lo, s_mid)
            lo, _ = span(s_hi)
            ax.set_xlim(lo, lo + s_hi * width)
            need = box.get_window_extent().y1 - bbox.y0 + gap  # pixels from the axes' bottom to the box's top
            r = max(0.0, (need * n - 0.15 * height) / (height - need)) if height > need else 3.0 * n
            ax.set_ylim(max(n, 1) - 0.5 + r, -0.5)


def plot_result_panel(results: dict, *, baseline: str = "ce", ours: str = "feature_kd", metric: str = "final",
                      ax: Axes | None = None, title: str | None = None) -> Figure:
    """The paper's result panel: horizontal bars of each method's mean accuracy gain over the `baseline` student in
    points, error bars = std over seeds clipped at 2 points (none for a single seed: "1 seed" is written instead),
    ours bold and red, its ablations hatched, baselines blue; a box with the teacher (pretrained or not), the
    student's accuracy, the ARI and the methods' notes. metric: "final" (final epoch, our headline) or "best" (best
    epoch, the paper's protocol)."""
    _metric_keys(metric)
    n = max(1, len([m for m in results["methods"] if m != baseline]))
    own = ax is None
    if own:
        fig = Figure(figsize=(7.5, 0.4 * n + 3.0), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    panel = _draw_result_panel(ax, results, baseline, ours, metric, title)
    if own:  # height = the layout's margins + 0.4 in per bar + the box
        fig.draw_without_rendering()
        inches = fig.get_size_inches()
        axes_h = ax.get_window_extent().height / fig.dpi
        box_h = panel[2].get_window_extent().height / fig.dpi
        fig.set_size_inches(inches[0], inches[1] - axes_h + 0.4 * n + box_h + 0.25)
    _fit_result_panels(fig, [panel])
    return fig


def plot_result_grid(cells: dict[tuple[str, str], dict], *, baseline: str = "ce", ours: str = "feature_kd",
                     metric: str = "final") -> Figure:
    """The paper's result grid: columns = datasets, rows = teacher-student pairs (in order of first appearance), one
    plot_result_panel per (dataset, pair) cell of `cells`; cells without results stay blank."""
    if not cells:
        raise ValueError("no cells to draw: pass {(dataset, pair): results}.")
    datasets = list(dict.fromkeys(d for d, _ in cells))
    pairs = list(dict.fromkeys(p for _, p in cells))
    n = max(len([m for m in r["methods"] if m != baseline]) for r in cells.values())
    fig = Figure(figsize=(6.2 * len(datasets), (0.4 * n + 2.6) * len(pairs)), layout="constrained")
    axes = fig.subplots(len(pairs), len(datasets), squeeze=False)
    panels = []
    for i, pair in enumerate(pairs):
        for j, dataset in enumerate(datasets):
            ax = axes[i, j]
            if (dataset, pair) not in cells:
                ax.axis("off")
                continue
            panels.append(_draw_result_panel(ax, cells[dataset, pair], baseline, ours, metric, f"{dataset}, {pair}"))
    fig.suptitle(f"Accuracy gain over the {baseline} student ({metric} epoch), points")
    _fit_result_panels(fig, panels)
    return fig


def plot_accuracy_curves(results: dict, *, baseline: str = "ce", methods: Sequence[str] | None = None,
                         ax: Axes | None = None, title: str | None = None, ours: str = "feature_kd") -> Figure:
    """Test accuracy against epoch per method (the paper's training-speed figure), with a marker at the first epoch
    at which each method reaches the `baseline` student's best accuracy.

    Each curve is the mean over seeds per epoch (results' "curve"); the paper plots the max over runs per epoch,
    which favours methods with more runs. The baseline's best is the max of its mean curve (dotted line). The y-range
    spans every epoch, the first ones included, and the legend sits outside the axes.
    """
    rows = results["methods"]
    base = _require(rows, baseline, "student baseline")
    if methods is None:
        order = {"ours": 1, "ablation": 2, "baseline": 3}
        methods = sorted((m for m in rows if "curve" in rows[m]),
                         key=lambda m: 0 if m == baseline else order[method_group(m, ours)])
    for m in methods:
        if "curve" not in _require(rows, m, "method to plot"):
            raise ValueError(f"results of {m!r} have no per-epoch 'curve'; rerun kdutils.results.summarize_runs.")
    base_label = _label(rows, baseline)
    curve = 100 * np.asarray(base["curve"], dtype=float)
    target = float(curve.max())
    entries = []
    for m in methods:
        epochs = np.asarray(rows[m]["epochs"])
        acc = 100 * np.asarray(rows[m]["curve"], dtype=float)
        reached = np.flatnonzero(acc >= target - 1e-9)
        if m == baseline:
            text = f"{_label(rows, m)} (best {target:.2f}% at epoch {epochs[int(acc.argmax())]})"
        elif reached.size:
            text = f"{_label(rows, m)}: reaches {base_label}'s best at epoch {epochs[reached[0]]}"
        else:
            text = f"{_label(rows, m)}: never reaches {base_label}'s best"
        if rows[m].get("note"):
            text += "\n" + "\n".join(textwrap.wrap(f"({rows[m]['note']})", 50, initial_indent="    ",
                                                   subsequent_indent="    "))
        entries.append((m, epochs, acc, reached[0] if reached.size and m != baseline else None, text))
    own = ax is None
    if own:  # room for the legend on the right: about 0.065 in per character of its longest line
        longest = max(len(line) for *_, text in entries for line in text.split("\n"))
        lines = sum(text.count("\n") + 1 for *_, text in entries) + 2
        fig = Figure(figsize=(6.5 + 0.065 * longest, max(4.8, 0.19 * lines + 1.2)), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    colours = [c for i, c in enumerate(sns.color_palette("tab10", 10)) if i not in (3, 7)]  # no red, no grey
    styles = ("-", "--", "-.", ":")
    others = 0
    lows, highs = [target], [target]
    for m, epochs, acc, first, text in entries:
        lows.append(float(acc.min()))
        highs.append(float(acc.max()))
        if m == baseline:
            colour, style, width = "black", "-", 1.8
        elif m == ours:
            colour, style, width = GROUP_STYLE["ours"][1], "-", 2.8
        else:
            colour, style, width = colours[others % len(colours)], styles[others // len(colours) % 4], 1.6
            others += 1
        ax.plot(epochs, acc, style, color=colour, lw=width, label=text, zorder=3,
                marker="o" if len(epochs) < 2 else None, ms=6)          # a one-epoch run is a point, not a gap
        if first is not None:
            ax.plot([epochs[first]], [acc[first]], "o", ms=9, mfc=colour, mec="black", mew=1.2, zorder=5,
                    gid=f"reach:{m}")
    ax.axhline(target, color="grey", ls=":", lw=1.2, label=f"{base_label}'s best: {target:.2f}%", zorder=2)
    ax.plot([], [], "o", ms=9, mfc="white", mec="black", mew=1.2, label=f"first epoch reaching {base_label}'s best")
    lo, hi = min(lows), max(highs)
    margin = max(0.1 * (hi - lo), 0.3)
    ax.set_ylim(lo - margin, hi + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    every = sorted({int(e) for _, epochs, *_ in entries for e in epochs})
    if len(every) < 3:                      # MaxNLocator would put fractional ticks on a one- or two-epoch axis
        ax.set_xticks(every)
        ax.set_xlim(every[0] - 0.5, every[-1] + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{results.get('dataset', '')}: test accuracy per epoch", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------------------------
# why logit losses hurt (notebook 5) and whether KQ picks well (notebook 6)

def plot_gradient_conflict(results: dict, *, title: str | None = None) -> Figure:
    """Per method with logit losses in the backbone and a monitored run: the cosine between the backbone
    gradients of the logit terms and of the feature term, per stage, against epoch (mean over seeds)."""
    rows = {m: r["monitor"]["grad_cosine"] for m, r in results["methods"].items()
            if r.get("monitor", {}).get("grad_cosine")}
    if not rows:
        raise ValueError("no method in these results has gradient-cosine measurements; train feature_kd_ce (or "
                         "fitnets_kd, fitnets_kd_nokl) with distill(..., monitor=True), the pipeline's monitor key.")
    fig = Figure(figsize=(4.2 * len(rows) + 1.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(rows), sharey=True, squeeze=False)[0]
    colours = sns.color_palette("viridis", max(len(c) for c in rows.values()))
    for ax, (method, cosines) in zip(axes, rows.items()):
        epochs = results["methods"][method]["epochs"]
        for colour, (stage, curve) in zip(colours, cosines.items()):
            ax.plot(epochs, [np.nan if v is None else v for v in curve], "-o", ms=3, color=colour, label=stage)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cos(grad logit terms, grad feature term)")
    axes[-1].legend(title="backbone stage", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle(title or "Do the logit and feature losses pull the backbone the same way? (> 0 agree, < 0 conflict)",
                 fontsize=10)
    return fig


def plot_feature_distance(results: dict, *, metric: str = "feature_mse", title: str | None = None) -> Figure:
    """Per distilled layer pair (columns) and per set of teacher layers (rows: methods that distil into the same
    teacher layers, e.g. KQ's or the standard ones, so each panel compares twins): the distance of the student's
    feature to its teacher target against epoch, one line per monitored method (feature_mse through the
    projector, on a log scale with plain tick labels, or feature_cka)."""
    rows = {m: r["monitor"][metric] for m, r in results["methods"].items() if r.get("monitor", {}).get(metric)}
    if not rows:
        raise ValueError(f"no method in these results has {metric!r} measurements; train with "
                         f"distill(..., monitor=True), the pipeline's monitor key.")
    groups: dict[str, list[str]] = {}
    for method in rows:
        groups.setdefault(REGISTRY[method].layers if method in REGISTRY else "other", []).append(method)
    names = {"quality": "KQ's teacher layers", "standard": "the standard teacher layers"}
    pairs = max(len(v) for v in rows.values())
    fig = Figure(figsize=(3.3 * pairs + 2.2, 3.0 * len(groups) + 0.6), layout="constrained")
    grid = fig.subplots(len(groups), pairs, squeeze=False)
    for (group, methods), axes in zip(groups.items(), grid):
        for i, ax in enumerate(axes):
            for method in methods:
                curves = rows[method]
                if i < len(curves):
                    free = method in REGISTRY and not REGISTRY[method].ce_backbone
                    ax.plot(results["methods"][method]["epochs"], curves[i], "-" if free else "--",
                            lw=2 if free else 1.4, label=f"{method}{' (CE-free)' if free else ''}")
            ax.set_title(f"{names.get(group, group)}: pair {i + 1}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if metric == "feature_mse":
                ax.set_yscale("log")
                plain_log_ticks(ax.yaxis)
        axes[0].set_ylabel({"feature_mse": "MSE to the teacher target", "feature_cka": "linear CKA with the target"}
                           .get(metric, metric))
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle(title or "Distance of the distilled student layers to the teacher's, on fixed training batches "
                          "(each row: methods with the same teacher layers)", fontsize=10)
    return fig


def plot_value_vs_score(values: pd.DataFrame, scores: pd.DataFrame, score: str = "quality", *,
                        selected: Sequence[int] = (), title: str | None = None) -> Figure:
    """Each teacher layer's measured value (notebook 6's swap sweep: change in validation accuracy against its stage's
    standard layer, in points, mean +- std over seeds) against a score, the points labelled by layer index, the
    zero line (the standard layers) drawn and the selected layers circled."""
    layers = list(values.index)
    x = scores.loc[layers, score].astype(float).to_numpy()
    y = 100 * values["value"].to_numpy(dtype=float)
    err = 100 * values["value_std"].fillna(0).to_numpy(dtype=float)
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(x, y, yerr=err if err.any() else None, fmt="o", color="dimgrey", ecolor="silver", capsize=3)
    for t, xi, yi in zip(layers, x, y):
        ax.annotate(str(t), (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=9)
        if t in set(selected):
            ax.plot([xi], [yi], "o", ms=13, mfc="none", mec="red", mew=1.5)
    ax.set_xlabel(KQ_STYLE[score][0] if score in KQ_STYLE else score)
    ax.axhline(0, color="black", lw=0.8, alpha=0.6)
    ax.set_ylabel("value: change in val. accuracy vs\nthe stage's standard layer (points)")
    ax.grid(alpha=0.3)
    if len(selected):
        ax.plot([], [], "o", ms=11, mfc="none", mec="red", mew=1.5, label="selected (top-k by this score)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Does the score order the layers by their value as a target?", fontsize=10)
    return fig


def plot_rank_correlations(correlations: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Spearman's rho of each predictor with the layers' measured value, with its bootstrap interval."""
    order = correlations.sort_values("spearman")
    fig = Figure(figsize=(6.0, 0.45 * len(order) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(order))
    rho = order["spearman"].to_numpy(dtype=float)
    lo = rho - order["ci_low"].to_numpy(dtype=float)
    hi = order["ci_high"].to_numpy(dtype=float) - rho
    colours = ["dimgrey" if p != "quality" else "red" for p in order.index]
    ax.barh(y, rho, color=colours, alpha=0.8)
    ax.errorbar(rho, y, xerr=[np.nan_to_num(lo), np.nan_to_num(hi)], fmt="none", ecolor="black", capsize=3)
    ax.set_yticks(y, [f"{order.loc[p, 'score']}" for p in order.index])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman's rho with the layer's value (95% bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "Which score predicts a teacher layer's value?", fontsize=10)
    return fig
