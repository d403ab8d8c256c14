"""Tests of the paper-style result figures (kdutils.result_plots) and the report command (kdutils.report), on a small
synthetic results dict built by kdutils.results.summarize_runs; the expected numbers are worked out by hand."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.text import Text

from kdutils import report
from kdutils.results import summarize_runs
from kdutils.result_plots import (average_relative_improvement, plot_accuracy_curves, plot_result_grid,
                                  plot_result_panel)

# test accuracy per epoch, one list per seed (3 epochs). Final-epoch means and gains over ce (0.50), in points:
# feature_kd .52 (+2.0), hinton_kd .51 (+1.0), fitnets_kd .54 (+4.0, std 5.66 -> bar clipped at 2), sp_kd .498
# (-0.2), simkd .503 (+0.3, one seed). Best-epoch means: ce .50, feature_kd .52 (+2), hinton_kd .52 (+2),
# fitnets_kd .54 (+4), sp_kd .498 (-0.2).
ACC = {
    "ce": [[0.40, 0.48, 0.50], [0.42, 0.50, 0.50]],
    "feature_kd": [[0.45, 0.51, 0.51], [0.47, 0.53, 0.53]],
    "hinton_kd": [[0.40, 0.52, 0.50], [0.40, 0.50, 0.52]],
    "fitnets_kd": [[0.44, 0.47, 0.50], [0.46, 0.52, 0.58]],
    "sp_kd": [[0.40, 0.45, 0.497], [0.40, 0.45, 0.499]],
    "simkd": [[0.40, 0.47, 0.503]],
}


@pytest.fixture
def results() -> dict:
    """summarize_runs output for ACC, with a display name and a note on the one-seed method."""
    runs = {m: [[{"epoch": e + 1, "loss": 1.0, "train_acc": a, "test_acc": a, "seconds": 2.0}
                 for e, a in enumerate(seed)] for seed in seeds] for m, seeds in ACC.items()}
    res = summarize_runs(runs, teacher={"model": "resnet34", "test_acc": 0.61, "pretrained": True},
                         preset="quick", dataset="cifar10")
    res["methods"]["simkd"].update(label="SimKD", note="evaluated with the reused teacher head")
    return res


def _texts(fig) -> list[str]:
    """Every text string drawn in a figure (labels, annotations, legend titles and entries)."""
    return [t.get_text() for t in fig.findobj(Text)]


def _label(res: dict, m: str) -> str:
    return res["methods"][m].get("label", m)


# ------------------------------------------------------------------------------------------------------------
# ARI

def test_ari_by_hand(results):
    # final: qualifying baselines (gain >= 0.5) are hinton_kd (+1) and fitnets_kd (+4); sp_kd (-0.2) and simkd
    # (+0.3) are out -> mean(2/1, 2/4) = 1.25
    assert average_relative_improvement(results) == pytest.approx(1.25)
    # best epoch: hinton_kd +2, fitnets_kd +4 -> mean(2/2, 2/4) = 0.75
    assert average_relative_improvement(results, metric="best") == pytest.approx(0.75)
    # restricted to hinton_kd alone: 2/1
    assert average_relative_improvement(results, baselines=("hinton_kd",)) == pytest.approx(2.0)
    assert any("ARI: 125%" in t for t in _texts(plot_result_panel(results)))
    assert any("ARI: 75%" in t for t in _texts(plot_result_panel(results, metric="best")))
    with pytest.raises(ValueError, match="metric"):
        average_relative_improvement(results, metric="mean")


def test_ari_none_when_no_baseline_gains_half_a_point(results):
    for m in ("hinton_kd", "fitnets_kd"):
        results["methods"][m]["final_acc_mean"] = 0.504          # +0.4 points
    assert average_relative_improvement(results) is None
    assert any("ARI: no baseline gains >= 0.5 pt" in t for t in _texts(plot_result_panel(results)))


def _unstable(fig) -> bool:
    """Whether the figure's ARI line says "Unstable"."""
    return any(line.startswith("ARI: Unstable") for t in _texts(fig) for line in t.split("\n"))


def test_ari_unstable_outside_0_to_1500_percent(results):
    m = results["methods"]
    m["feature_kd"]["final_acc_mean"] = 0.49                      # ours -1: mean(-1/1, -1/4) = -0.625 <= 0
    assert average_relative_improvement(results) == pytest.approx(-0.625)
    assert _unstable(plot_result_panel(results))
    m["feature_kd"]["final_acc_mean"] = 0.60                      # ours +10
    m["hinton_kd"]["final_acc_mean"] = 0.506                      # +0.6
    m["fitnets_kd"]["final_acc_mean"] = 0.51                      # +1.0: mean(10/0.6, 10/1) = 13.3 < 15: shown
    assert average_relative_improvement(results) == pytest.approx((10 / 0.6 + 10) / 2)
    fig = plot_result_panel(results)
    assert not _unstable(fig) and any("ARI: 1333%" in t for t in _texts(fig))
    m["fitnets_kd"]["final_acc_mean"] = 0.506                     # +0.6: mean(10/0.6, 10/0.6) = 16.7 >= 15
    assert average_relative_improvement(results) == pytest.approx(10 / 0.6)
    assert _unstable(plot_result_panel(results))


# ------------------------------------------------------------------------------------------------------------
# result panel

def test_panel_error_bars_one_seed_and_clipping(results):
    fig = plot_result_panel(results)
    ax = fig.axes[0]
    labels = {round(y): t.get_text() for y, t in zip(ax.get_yticks(), ax.get_yticklabels())}
    [bars] = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    half = {}
    for (x0, y0), (x1, _) in bars.lines[2][0].get_segments():
        half[labels[round(y0)]] = (x1 - x0) / 2
    simkd = _label(results, "simkd")
    assert not any(name.startswith(simkd) for name in half)                     # no error bar, not even a +-0
    assert half[_label(results, "feature_kd")] == pytest.approx(100 * np.std([0.51, 0.53], ddof=1))  # 1.41
    assert half[_label(results, "fitnets_kd")] == pytest.approx(2.0)           # 5.66 clipped at 2
    assert len(half) == 4                                                       # the four 2-seed methods
    texts = _texts(fig)
    assert "+0.30 (1 seed)" in texts and "+4.00 \u00b1 5.66" in texts          # labels give the real std
    assert any("evaluated with the reused teacher head" in t for t in texts)   # the note as a footnote
    assert any(t.startswith(simkd + "\u2020") for t in labels.values())        # ... marked on its label
    assert any("teacher resnet34 (ImageNet-pretrained): 61.00%" in t for t in texts)


def test_panel_layout_nothing_overlaps(results):
    results["methods"]["sp_kd"]["final_acc_mean"] = 0.47          # a negative bar with its label on the left
    for fig in (plot_result_panel(results), plot_result_panel(results, metric="best")):
        fig.draw_without_rendering()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        assert lo < 0 < hi
        box = ax.get_window_extent()
        for t in ax.texts:                                        # value labels inside the axes
            e = t.get_window_extent()
            assert box.x0 <= e.x0 and e.x1 <= box.x1, t.get_text()
        legend = ax.get_legend().get_window_extent()
        for bar in ax.patches:                                    # the text box covers no bar
            assert not bar.get_window_extent().overlaps(legend)
        ticks = [t.get_window_extent() for t in ax.get_yticklabels()]
        assert not any(a.overlaps(b) for i, a in enumerate(ticks) for b in ticks[i + 1:])


def test_grid_blank_cell(results):
    other = copy.deepcopy(results)
    other["teacher"]["pretrained"] = False
    fig = plot_result_grid({("cifar10", "rn34-rn9"): results, ("cifar100", "rn34-rn9"): other,
                            ("cifar10", "vgg19-vgg11"): results})
    axes = fig.axes
    assert len(axes) == 4 and [ax.axison for ax in axes] == [True, True, True, False]
    assert [ax.get_title() for ax in axes[:3]] == ["cifar10, rn34-rn9", "cifar100, rn34-rn9", "cifar10, vgg19-vgg11"]
    assert any("teacher resnet34 (from scratch): 61.00%" in t for t in _texts(fig))


# ------------------------------------------------------------------------------------------------------------
# accuracy curves

def test_curves_mark_first_epoch_reaching_the_baseline_best(results):
    fig = plot_accuracy_curves(results)
    ax = fig.axes[0]
    marks = {line.get_gid().split(":")[1]: (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.lines if (line.get_gid() or "").startswith("reach:")}
    # ce's best mean curve value is 50.0 (epoch 3); mean curves: feature_kd 46/52/52, hinton_kd 40/51/51,
    # fitnets_kd 45/49.5/54, simkd 40/47/50.3, sp_kd 40/45/49.8 (never)
    assert marks == {"feature_kd": ([2], [pytest.approx(52.0)]), "hinton_kd": ([2], [pytest.approx(51.0)]),
                     "fitnets_kd": ([3], [pytest.approx(54.0)]), "simkd": ([3], [pytest.approx(50.3)])}
    ce = _label(results, "ce")
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"{_label(results, 'feature_kd')}: reaches {ce}'s best at epoch 2" in entries
    assert f"{_label(results, 'sp_kd')}: never reaches {ce}'s best" in entries
    fig.draw_without_rendering()                                  # legend outside the axes, y-range zoomed
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    lo, hi = ax.get_ylim()
    assert 37 < lo < 40 and 54 < hi < 56                          # every epoch shown, the first (40) included


# ------------------------------------------------------------------------------------------------------------
# the report command

def test_write_report(tmp_path, results):
    (tmp_path / "results.json").write_text(json.dumps(results))
    for _ in range(2):                                            # rewriting replaces the files
        paths = report.write_report(tmp_path)
    assert set(paths) == {"results_md", "result_panel", "result_panel_best", "accuracy_curves"}
    assert "Teacher `resnet34` (ImageNet-pretrained, fine-tuned): 61.00%" in paths["results_md"].read_text()
    for name in ("result_panel", "result_panel_best", "accuracy_curves"):
        png = paths[name]
        assert png == tmp_path / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(tmp_path.rglob("*.tmp"))


def test_main_missing_results_is_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "05_compare_to_hinton_kd" in err and "results.json" in err and "Traceback" not in err


def test_main_writes_each_run_dir(tmp_path, results, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(results))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{not json")
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and (tmp_path / "a" / "figures" / "accuracy_curves.png").is_file()
    assert len(err.strip().splitlines()) == 1 and "not valid JSON" in err


# ------------------------------------------------------------------------------------------------------------
# gradient conflict, feature distance, and notebook 6's figures

def _monitored() -> dict:
    row = lambda e, cos, mse: {"epoch": e, "loss": 1.0, "train_acc": 0.5, "test_acc": 0.5, "seconds": 1.0,  # noqa: E731
                               "monitor": {"feature_mse": mse, "feature_cka": [0.9, 0.8],
                                           **({"grad_cosine": {"layer 1": cos, "layer 2": None}} if cos else {})}}
    runs = {"feature_kd": [[row(1, None, [0.3, 0.2]), row(2, None, [0.2, 0.1])]],
            "feature_kd_ce": [[row(1, 0.2, [0.4, 0.3]), row(2, -0.1, [0.35, 0.3])]]}
    return summarize_runs(runs, teacher={"model": "t", "test_acc": 0.9}, preset="quick", dataset="digits")


def test_gradient_conflict_and_feature_distance_plots():
    from kdutils.result_plots import plot_feature_distance, plot_gradient_conflict
    res = _monitored()
    fig = plot_gradient_conflict(res)
    ax = fig.axes[0]
    assert ax.get_title() == "feature_kd_ce" and len(fig.axes) == 1           # only methods with CE in the backbone
    lines = [ln for ln in ax.get_lines() if ln.get_label() in ("layer 1", "layer 2")]
    assert list(lines[0].get_ydata()) == pytest.approx([0.2, -0.1])
    assert np.isnan(lines[1].get_ydata()).all()                             # no gradient: a gap, not a zero
    fig = plot_feature_distance(res)
    assert len(fig.axes) == 2
    styles = {ln.get_label(): ln.get_linestyle() for ln in fig.axes[0].get_lines()}
    assert styles == {"feature_kd (CE-free)": "-", "feature_kd_ce": "--"}
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == pytest.approx([0.2, 0.1])
    twins = {"methods": {**res["methods"], "standard_layers": res["methods"]["feature_kd"]}}
    fig = plot_feature_distance(twins)                    # another set of teacher layers: a row of its own
    assert len(fig.axes) == 4 and fig.axes[2].get_title().startswith("the standard teacher layers")
    assert {ln.get_label() for ln in fig.axes[2].get_lines()} == {"standard_layers (CE-free)"}
    assert fig.axes[0].yaxis.get_major_formatter()(0.3, 0) == "0.3"          # plain numbers on the log axis
    with pytest.raises(ValueError, match="monitor=True"):
        plot_gradient_conflict({"methods": {"feature_kd": {"monitor": {"feature_mse": [[1.0]]}}}})


def test_value_vs_score_and_rank_correlation_plots():
    import pandas as pd
    from kdutils.result_plots import plot_rank_correlations, plot_value_vs_score
    values = pd.DataFrame({"value": [0.3, 0.6, 0.5], "value_std": [0.01, np.nan, 0.02]}, index=[0, 1, 2])
    scores = pd.DataFrame({"quality": [0.1, 0.5, 0.9]}, index=[0, 1, 2])
    fig = plot_value_vs_score(values, scores, "quality", selected=[1, 2])
    assert {"0", "1", "2"} <= set(_texts(fig))
    rings = [ln for ln in fig.axes[0].get_lines() if ln.get_markeredgecolor() == "red" and len(ln.get_xdata())]
    assert sorted(float(ln.get_xdata()[0]) for ln in rings) == pytest.approx([0.5, 0.9])
    corr = pd.DataFrame({"score": ["Q", "depth"], "spearman": [0.5, -0.2], "ci_low": [0.1, -0.6],
                         "ci_high": [0.8, 0.3]}, index=["quality", "depth"])
    fig = plot_rank_correlations(corr)
    bars = sorted(p.get_width() for p in fig.axes[0].patches)
    assert bars == pytest.approx([-0.2, 0.5]) and fig.axes[0].get_xlim() == pytest.approx((-1.05, 1.05))


def test_history_plot_integer_epochs_and_legend_outside():
    from kdutils.plots import plot_history
    hist = [{"epoch": e, "loss": 1.0 / e, "train_acc": 0.5 + 0.1 * e, "test_acc": 0.4 + 0.1 * e} for e in (1, 2, 3)]
    fig = plot_history({"a": [hist], "b": [hist]})
    fig.canvas.draw()
    ticks = [t for t in fig.axes[-1].get_xticks() if fig.axes[-1].get_xlim()[0] <= t <= fig.axes[-1].get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks)
    legend = fig.axes[-1].get_legend()
    box, axes_box = legend.get_window_extent(), fig.axes[-1].get_window_extent()
    assert box.x0 >= axes_box.x1 and fig.axes[0].get_legend() is None     # beside the axes, not over a curve


def test_report_of_a_monitored_run_with_notebook_6(tmp_path):
    """The committed quick report (monitored, with notebook 6's block) gets the three extra figures; a run without
    them does not."""
    results = json.loads((Path(__file__).resolve().parents[1] / "reports" / "quick" / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps(results))
    paths = report.write_report(tmp_path)
    assert {"gradient_conflict", "feature_distance", "kq_rank_correlations"} <= set(paths)
    for name in ("gradient_conflict", "feature_distance", "kq_rank_correlations"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    del results["kq_validation"]
    for method in results["methods"].values():
        method.pop("monitor", None)
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert set(report.write_report(tmp_path)) == {"results_md", "result_panel", "result_panel_best", "accuracy_curves"}


def test_a_one_epoch_run_keeps_integer_ticks_and_its_points():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from kdutils.result_plots import plot_accuracy_curves
    from kdutils.results import summarize_runs
    one = lambda a: [[{"epoch": 1, "loss": 1.0, "train_acc": a, "test_acc": a, "seconds": 1.0}]]  # noqa: E731
    results = summarize_runs({"ce": one(0.5), "feature_kd": one(0.55)}, teacher={"model": "t", "test_acc": 0.9},
                             preset="p", dataset="d")
    fig = plot_accuracy_curves(results)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert shown == [1]                                                      # no 0.96, 0.975, ... ticks
    points = [ln for ln in ax.get_lines() if ln.get_label().startswith(("Student (best", "Ours"))]
    assert len(points) == 2 and all(ln.get_marker() == "o" for ln in points)   # the ce run is drawn, as a point
