"""Rebuild a run's report from its results.json: the Markdown table and the paper-style figures.

`python -m kdutils.report RUN_DIR [RUN_DIR ...]` (re)writes, for each run directory, RUN_DIR/results.md and
RUN_DIR/figures/{result_panel.png, result_panel_best.png, accuracy_curves.png} from RUN_DIR/results.json (written by
notebook 05_compare_to_hinton_kd), plus gradient_conflict.png and feature_distance.png when the run was monitored
and kq_rank_correlations.png when notebook 6 added its kq_validation block. Every file is written to a temporary
file in its folder and renamed into place, so an interrupted report never leaves half a file. Nothing is trained or
recomputed.

Called by its command line, notebook 5 (write_report after its table) and kdutils.sweep (each combination's report,
save_figure for the grid's figures).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.figure import Figure

from kdutils.results import RESULTS_FILE, results_markdown
from kdutils.rundir import require_artifact, write_atomic
from kdutils.result_plots import (plot_accuracy_curves, plot_feature_distance, plot_gradient_conflict,
                                  plot_rank_correlations, plot_result_panel)

RESULTS_NOTEBOOK = "05_compare_to_hinton_kd.ipynb"
DPI = 120
FIGURES = {  # output name: (file under RUN_DIR/figures, what it shows)
    "result_panel": ("result_panel.png", "gain over the CE student, final epoch (our headline)"),
    "result_panel_best": ("result_panel_best.png", "gain over the CE student, best epoch (the paper's protocol)"),
    "accuracy_curves": ("accuracy_curves.png", "test accuracy per epoch, first epoch reaching CE's best"),
    "gradient_conflict": ("gradient_conflict.png", "cosine of the logit and feature gradients per stage (monitored)"),
    "feature_distance": ("feature_distance.png", "feature MSE of each distilled pair to the teacher (monitored)"),
    "kq_rank_correlations": ("kq_rank_correlations.png", "notebook 6: Spearman's rho of each score with a layer's "
                                                         "measured value"),
}


def save_figure(fig: Figure, path: Path) -> Path:
    """Save a figure as PNG at DPI, atomically."""
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _figures(results: dict) -> dict[str, Figure]:
    """The report's figures of one results dict, by output name."""
    where = f"{results.get('dataset', '?')} ({results.get('preset', '?')})"
    figures = {
        "result_panel": plot_result_panel(results, metric="final",
                                          title=f"{where}: final-epoch accuracy gain over the student"),
        "result_panel_best": plot_result_panel(results, metric="best",
                                               title=f"{where}: best-epoch accuracy gain over the student"),
        "accuracy_curves": plot_accuracy_curves(results),
    }
    monitored = [r.get("monitor", {}) for r in results["methods"].values()]
    if any(m.get("grad_cosine") for m in monitored):
        figures["gradient_conflict"] = plot_gradient_conflict(results)
    if any(m.get("feature_mse") for m in monitored):
        figures["feature_distance"] = plot_feature_distance(results)
    correlations = results.get("kq_validation", {}).get("correlations")
    if correlations:
        figures["kq_rank_correlations"] = plot_rank_correlations(
            pd.DataFrame(correlations).T, title=f"{where}\nwhich score predicts a teacher layer's value?")
    return figures


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """(Re)write run_dir/results.md and run_dir/figures/*.png from run_dir/results.json; return the paths by name."""
    run_dir = Path(run_dir)
    source = require_artifact(run_dir / RESULTS_FILE, RESULTS_NOTEBOOK)
    try:
        results = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err}); rerun notebooks/{RESULTS_NOTEBOOK}.") from err
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict) or "teacher" not in results:
        raise ValueError(f"{source} has no 'methods'/'teacher' entries; it was not written by "
                         f"kdutils.results.summarize_runs (notebooks/{RESULTS_NOTEBOOK}).")
    try:
        table = results_markdown(results)
        figures = _figures(results)
    except (KeyError, ValueError, TypeError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{source}: {detail}") from err
    paths = {"results_md": write_atomic(run_dir / "results.md", lambda f: f.write(table), mode="w")}
    for name, fig in figures.items():
        paths[name] = save_figure(fig, run_dir / "figures" / FIGURES[name][0])
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m kdutils.report`."""
    written = "\n".join(f"  RUN_DIR/figures/{file}: {what}" for file, what in FIGURES.values())
    parser = argparse.ArgumentParser(
        prog="python -m kdutils.report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Rebuild the report of finished runs from RUN_DIR/{RESULTS_FILE} (written by notebook "
                    f"{RESULTS_NOTEBOOK}); nothing is retrained. Writes, replacing earlier versions atomically:\n"
                    f"  RUN_DIR/results.md: the results table\n{written}",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory of the pipeline")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 a run directory failed, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        try:
            paths = write_report(run_dir)
        except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
            print(f"error: {err}", file=sys.stderr)
            status = 1
            continue
        for path in paths.values():
            print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
