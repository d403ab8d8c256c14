"""Figures for the knowledge-quality and layer-geometry notebooks.

Every function returns a matplotlib Figure built without pyplot (no global figure state): in Jupyter the returned
figure is displayed once; elsewhere call `fig.savefig(path)`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

KQ_STYLE = {  # column: (label, colour, line width) -- the paper's colours for the four curves
    "separation": ("Separation S", "midnightblue", 2.0),
    "information": ("Information I", "darkturquoise", 2.0),
    "efficiency": ("Efficiency E", "red", 2.0),
    "quality": (r"Knowledge quality $Q = S + \sqrt{I \cdot E}$", "dimgrey", 3.0),
}


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
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


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
