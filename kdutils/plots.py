"""Figures for the notebooks: knowledge quality and layer geometry, sample images, training curves, and the
layer-pair diagram of the CE-free recipe.

Called by notebook 1 (show_images, plot_history), notebook 2 (plot_geometry_summary, plot_pca, plot_class_spectra),
notebook 3 (plot_kq_curves), notebook 4 (plot_history, plot_layer_pairs) and kdutils.result_plots (KQ_STYLE); the
figures of trained runs' results are in kdutils.result_plots. Every plotting function returns a matplotlib Figure
built without pyplot (no global figure state): in Jupyter the returned figure is displayed once; elsewhere call
`fig.savefig(path)`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

KQ_STYLE = {  # column: (label, colour, line width) -- the paper's colours for the four curves
    "separation": ("Separation S", "midnightblue", 2.0),
    "information": ("Information I", "darkturquoise", 2.0),
    "efficiency": ("Efficiency E", "red", 2.0),
    "quality": (r"Knowledge quality $Q = S + \sqrt{I \cdot E}$", "dimgrey", 3.0),
}


def plain_log_ticks(axis: "matplotlib.axis.Axis", minor: bool = True) -> None:
    """Plain numbers (0.5, 2, 100) instead of powers of ten on a log axis; minor ticks labelled small when asked."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    if minor:
        axis.set_minor_formatter(plain)
        axis.set_tick_params(which="minor", labelsize=7)


def _layer_axis(ax, index: Sequence[int]) -> None:
    """Integer ticks at every layer index and a labelled x axis."""
    ax.set_xticks(list(index))
    ax.set_xlabel("generalized layer index")
    ax.grid(alpha=0.3)


def plot_kq_curves(qualities: pd.DataFrame, selected: Sequence[int] | None = None, *, title: str | None = None,
                   terms: Sequence[str] = ("separation", "information", "efficiency", "quality")) -> Figure:
    """S, I, E and Q against layer index (one axes, as the paper draws them); `selected` layers are shaded and
    marked on the Q curve."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.asarray(qualities.index)
    for term in terms:
        label, colour, width = KQ_STYLE[term]
        ax.plot(x, qualities[term], color=colour, lw=width, marker="o", ms=3, label=label)
    if selected:
        for i, layer in enumerate(sorted(selected)):
            ax.axvspan(layer - 0.4, layer + 0.4, color="gold", alpha=0.25, lw=0,
                       label="selected teacher layers" if i == 0 else None)
        q = qualities.loc[list(selected), "quality"]
        ax.scatter(q.index, q.values, s=90, marker="*", color="darkorange", zorder=5, edgecolor="black", lw=0.5)
    _layer_axis(ax, x)
    ax.set_ylabel("value")
    ax.set_title(title or "Layer-wise knowledge quality")
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_geometry_summary(qualities: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Six panels per layer: within/between-class |cos|, closest cross-class distance vs mean norm, the margin
    2 d_min / |f|, class embedding dimension, class SVD entropy, and linear-probe accuracy."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3)
    x = np.asarray(qualities.index)
    q = qualities

    ax = axes[0, 0]
    ax.plot(x, q["intra_cos"], "o-", color="tab:blue", label="mean within-class |cos|")
    ax.plot(x, q["min_intra_cos"], "o--", color="tab:blue", alpha=0.6, label="min within-class |cos| (class mean)")
    ax.plot(x, q["inter_cos"], "o-", color="tab:orange", label="mean between-class |cos|")
    ax.set_ylabel("|cosine similarity|")
    ax.set_title("Angular compactness vs separation")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    ax.plot(x, q["mean_min_dist"], "o-", color="tab:red", label="closest other-class sample (class mean)")
    ax.plot(x, q["mean_norm"], "o-", color="black", label="feature norm (class mean)")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_ylabel("Euclidean length")
    ax.set_title("Margin and scale")
    ax.legend(fontsize=7)

    ax = axes[0, 2]
    ax.plot(x, q["margin"], "o-", color="tab:red")
    ax.set_ylabel(r"$2\,\overline{d_{min}}\,/\,\overline{\|f\|}$")
    ax.set_title(r"Relative margin (E without $(N/\pi)^{1/ID_g}$)")

    ax = axes[1, 0]
    ax.plot(x, q["ed_mean"], "o-", color="tab:green", label="mean class embedding dim. (95% var.)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("dimensions")
    ax.set_title("Class-wise embedding dimension")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    ax.plot(x, q["entropy"], "o-", color="tab:purple", label="mean class SVD entropy (nats)")
    ax.plot(x, np.log(np.maximum(q["truncation"].astype(float), 1.0)), ":", color="grey",
            label="ln T (upper bound)")
    ax.set_ylabel("entropy (nats)")
    ax.set_title("Class spectrum entropy")
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    if "probe_acc" in q and q["probe_acc"].notna().any():
        ax.plot(x, q["probe_acc"], "o-", color="tab:brown")
        ax.set_ylim(0, 1)
    else:
        ax.text(0.5, 0.5, "probe not computed", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("test accuracy")
    ax.set_title("Linear probe on pooled features")

    for ax in axes.flat:
        _layer_axis(ax, x)
    fig.suptitle(title or "Per-layer feature geometry")
    return fig


def plot_pca(analysis: dict[int, dict], layers: Sequence[int] | None = None, classes: Sequence[str] | None = None,
             *, max_points: int = 2000, seed: int = 0) -> Figure:
    """2-D PCA scatter of the sampled features of a few layers (from kq.layer_analysis), coloured by class."""
    layers = list(analysis) if layers is None else list(layers)
    missing = [i for i in layers if i not in analysis]
    if missing:
        raise ValueError(f"layers {missing} are not in the analysis; compute them with kq.layer_analysis(..., "
                         f"layers={layers}).")
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(3.4 * cols + 1.5, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    first = analysis[layers[0]]
    names = list(classes) if classes is not None else [str(c) for c in first["classes"]]
    palette = sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))
    for ax, layer in zip(axes, layers):
        r = analysis[layer]
        pts, lab = np.asarray(r["pca2d"]), np.asarray(r["labels"])
        keep = np.random.default_rng(seed).permutation(len(pts))[:max_points]
        for c in range(len(names)):
            m = keep[lab[keep] == c]
            ax.scatter(pts[m, 0], pts[m, 1], s=5, alpha=0.6, color=palette[c], label=names[c], rasterized=True)
        ax.set_title(f"layer {layer} ({r['kind']}, {r['shape']})", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.tick_params(labelsize=7)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, markerscale=3, title="class")
    fig.suptitle("Sampled train features, first two principal components")
    return fig


def plot_class_spectra(analysis: dict[int, dict], layers: Sequence[int], *, threshold: float = 0.95) -> Figure:
    """Cumulative explained variance of each class's centred spectrum for a few layers; the dotted line is the
    threshold that defines the class embedding dimension."""
    fig = Figure(figsize=(3.6 * len(layers), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(layers), squeeze=False)).ravel()
    for ax, layer in zip(axes, layers):
        r = analysis[layer]
        spectra = np.asarray(r["class_spectra"])
        k = np.arange(1, spectra.shape[1] + 1)
        for c, row in enumerate(spectra):
            ax.plot(k, np.cumsum(row), lw=1, alpha=0.8)
        ax.axhline(threshold, ls=":", color="black")
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis, minor=False)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("number of principal directions k")
        ax.set_title(f"layer {layer}: mean ED {r['ed_mean']:.0f}, T = {r['truncation']}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative explained variance")
    fig.suptitle("Class-wise PCA spectra (one line per class)")
    return fig


# ------------------------------------------------------------------------------------------------------------------
# data and training figures

def show_images(data, n: int = 24, *, split: str = "train", seed: int = 0) -> Figure:
    """A grid of n random images of a kdutils.data.Dataset split, titled with their class names."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    cols = min(8, n)
    rows = -(-len(idx) // cols)
    fig = Figure(figsize=(1.3 * cols, 1.45 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, i in zip(axes, idx):
        ax.imshow(x[i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(str(data.classes[int(y[i])]), fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{data.name}: {split} images ({data.image_size}x{data.image_size})")
    return fig


def _curve(histories: Sequence[Sequence[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std over runs of one history column (runs truncated to the shortest)."""
    n = min(len(h) for h in histories)
    values = np.array([[row[key] for row in h[:n]] for h in histories], dtype=float)
    return np.arange(1, n + 1), values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(n)


def plot_history(runs: dict[str, Sequence[Sequence[dict]]], *, title: str | None = None,
                 metric_only: bool = False) -> Figure:
    """Training curves of fit histories, {label: [history per seed]}: mean over seeds, a band of +-1 std.

    Two panels (training loss; train accuracy dashed, test accuracy solid), or only test accuracy when
    metric_only (losses of different methods are not comparable)."""
    fig = Figure(figsize=(6.5 if metric_only else 12, 4), layout="constrained")
    axes = [fig.add_subplot()] if metric_only else list(fig.subplots(1, 2))
    palette = sns.color_palette("tab10", max(len(runs), 1))
    for colour, (label, histories) in zip(palette, runs.items()):
        epochs, mean, std = _curve(histories, "test_acc")
        acc_ax = axes[-1]
        acc_ax.plot(epochs, mean, "o-", ms=3, color=colour, label=f"{label} (test)")
        acc_ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
        if not metric_only:
            _, train, _ = _curve(histories, "train_acc")
            acc_ax.plot(epochs, train, "--", color=colour, alpha=0.7, label=f"{label} (train)")
            _, loss, loss_std = _curve(histories, "loss")
            axes[0].plot(epochs, loss, "o-", ms=3, color=colour, label=label)
            axes[0].fill_between(epochs, loss - loss_std, loss + loss_std, color=colour, alpha=0.15, lw=0)
    if not metric_only:
        axes[0].set_ylabel("training loss")
        axes[0].set_title("Loss")
    axes[-1].set_ylabel("accuracy")
    axes[-1].set_title("Accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # no legend over a curve: one legend, outside the axes on the right
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------------------------
# the CE-free recipe as a picture (notebook 4)

def plot_layer_pairs(teacher_table: pd.DataFrame, student_table: pd.DataFrame, pairs: Sequence[tuple[int, int]], *,
                     stop_after: int | None = None, title: str | None = None) -> Figure:
    """The distillation wiring: the teacher's and the student's generalized layers as two columns of boxes (index,
    module path, per-sample shape), one arrow per (student layer, teacher layer) pair -- the teacher feature is the
    target of the student feature through a 1x1 projector -- and a stop-gradient bar after the student's layer
    `stop_after` (default: its deepest distilled layer), below which the head learns by CE on detached features.

    The tables are kdutils.layers.layer_table frames (an "index" column or index, plus "path" and "shape"). Both
    columns span the same height, so a box's height on the page is its relative depth in its network.
    Artists carry gids for tests: "layer:teacher:<i>", "layer:student:<i>", "pair:<s>-<t>", "stop-gradient".
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    def rows(table: pd.DataFrame) -> pd.DataFrame:
        return (table.set_index("index") if "index" in table.columns else table).sort_index()

    def shape_text(shape) -> str:
        return "\u00d7".join(str(int(d)) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))

    def channels(shape) -> int:             # (C, H, W) maps and (C,) vectors: C; ViT tokens (T, W): W
        return int(shape[-1] if len(shape) == 2 else shape[0])

    teacher, student = rows(teacher_table), rows(student_table)
    pairs = [(int(s), int(t)) for s, t in pairs]
    missing = ([f"student layer {s}" for s, _ in pairs if s not in student.index]
               + [f"teacher layer {t}" for _, t in pairs if t not in teacher.index])
    if missing:
        raise ValueError(f"pairs name layers the tables do not have: {', '.join(missing)}.")
    stop = max(s for s, _ in pairs) if stop_after is None and pairs else stop_after
    distilled_s, distilled_t = {s for s, _ in pairs}, {t for _, t in pairs}
    depth = max(len(teacher), len(student), 2) - 1            # both columns span rows 0..depth
    fig = Figure(figsize=(11, 0.36 * (depth + 1) + 2.0), layout="constrained")
    ax = fig.add_subplot()
    box_h = min(0.72, 0.72 * depth / max(len(teacher) - 1, len(student) - 1, 1))
    xs = {"teacher": (0.3, 3.9), "student": (6.1, 9.7)}        # left, right edge of each column

    def y_of(table: pd.DataFrame, i: int) -> float:
        position = list(table.index).index(i)
        return position * depth / max(len(table) - 1, 1)

    def box(role: str, y: float, text: str, face: str, edge: str, gid: str, weight: str = "normal") -> None:
        left, right = xs[role]
        ax.add_patch(FancyBboxPatch((left, y - box_h / 2), right - left, box_h,
                                    boxstyle="round,pad=0,rounding_size=0.08", facecolor=face, edgecolor=edge,
                                    lw=1.0, gid=gid))
        ax.text((left + right) / 2, y, text, ha="center", va="center", fontsize=7.5, fontweight=weight,
                family="monospace", gid=f"{gid}:label")

    for i, row in teacher.iterrows():
        chosen = i in distilled_t
        box("teacher", y_of(teacher, i), f"{i:>2}  {row['path']}  {shape_text(row['shape'])}",
            "#f7dc6f" if chosen else "#eeeeee", "#7d6608" if chosen else "#999999", f"layer:teacher:{i}",
            "bold" if chosen else "normal")
    for i, row in student.iterrows():
        head = stop is not None and i > stop
        face, edge = ("#fad7a0", "#b9770e") if head else (("#85c1e9", "#1b4f72") if i in distilled_s
                                                         else ("#d6eaf8", "#5d6d7e"))
        box("student", y_of(student, i), f"{i:>2}  {row['path']}  {shape_text(row['shape'])}", face, edge,
            f"layer:student:{i}", "bold" if i in distilled_s else "normal")
    bottom = depth + 1.1
    box("teacher", bottom, "classifier \u2192 logits (not used)", "#eeeeee", "#999999", "head:teacher")
    box("student", bottom, "classifier \u2192 logits \u2192 CE(\u00b7, y)", "#fad7a0", "#b9770e", "head:student",
        "bold")

    for k, (s, t) in enumerate(sorted(pairs), start=1):
        ys, yt = y_of(student, s), y_of(teacher, t)
        ax.add_patch(FancyArrowPatch((xs["teacher"][1], yt), (xs["student"][0], ys), arrowstyle="-|>",
                                     mutation_scale=12, color="#7d6608", lw=1.4, shrinkA=2, shrinkB=2,
                                     gid=f"pair:{s}-{t}"))
        c_s, c_t = channels(student.loc[s, "shape"]), channels(teacher.loc[t, "shape"])
        x0, x1 = xs["teacher"][1], xs["student"][0]          # the projector sits on its arrow, near the student
        ax.text(x0 + 0.7 * (x1 - x0), yt + 0.7 * (ys - yt), f"P{k}: 1\u00d71 {c_s}\u2192{c_t}", ha="center",
                va="center", fontsize=7, color="#7d6608", gid=f"pair:{s}-{t}:label",
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="#7d6608", lw=0.6))

    if stop is not None:
        below = [i for i in student.index if i > stop]
        y_stop = y_of(student, stop)
        y_bar = (y_stop + (y_of(student, below[0]) if below else bottom)) / 2
        y_bar = min(y_bar, y_stop + box_h / 2 + 0.45)
        left, right = xs["student"]
        ax.plot([left - 0.15, right + 0.15], [y_bar, y_bar], color="#c0392b", lw=2.2, ls=(0, (4, 2)),
                gid="stop-gradient")
        ax.text(right + 0.3, y_bar, f"stop-gradient after layer {stop}\n(head input detached: CE trains only the "
                                    f"head)", ha="left", va="center", fontsize=8, color="#c0392b",
                gid="stop-gradient:label")
        ax.text(right + 0.3, (y_bar + bottom) / 2 + 0.3, "head: learns by CE", ha="left", va="center", fontsize=8,
                color="#b9770e")
        ax.text(right + 0.3, y_stop / 2, "backbone: learns only\nfrom the feature MSE", ha="left", va="center",
                fontsize=8, color="#1b4f72")
    ax.text(sum(xs["teacher"]) / 2, -1.0, "teacher (frozen)", ha="center", va="center", fontsize=10,
            fontweight="bold")
    ax.text(sum(xs["student"]) / 2, -1.0, "student", ha="center", va="center", fontsize=10, fontweight="bold")
    ax.text(0.3, bottom + 0.75, "Arrow: the teacher layer's feature (pooled to a common size) is the MSE target of "
                                "the student layer's feature after its 1\u00d71 projector P_i (student \u2192 teacher "
                                "channels).", ha="left", va="center", fontsize=8, color="#444444")
    ax.set_xlim(0, 13.4)
    ax.set_ylim(bottom + 1.1, -1.6)
    ax.set_axis_off()
    ax.set_title(title or "Which teacher layer each student layer learns from, and where the gradient stops",
                 fontsize=10)
    return fig
