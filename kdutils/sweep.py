"""The paper's grid on Ray: datasets x teacher-student pairs x methods x seeds, spread over GPUs and machines.

    python -m kdutils.sweep --preset cifar10 --datasets cifar10 cifar100 --pairs resnet34-resnet9 vgg19-vgg11 \
        --seeds 0 1 2 [--address auto] [--root runs/sweep]

Needs the optional extra `pip install -e ".[sweep]"` (Ray; `.[dev]` includes it). For every (dataset, pair)
combination, notebooks 1-3 (teacher, geometry, KQ) run once, headless, into ROOT/<dataset>/<pair>/ as one Ray task
(one GPU, or --teacher-threads CPU threads). Then every (method, seed) student run is its own Ray task with a GPU
share (--gpus-per-student, fractional for small students) or --threads CPU threads, and makes exactly notebook 5's
`distill` call, writing the same checkpoint (RUN_DIR/students/<method>-seed<seed>.pt): a sweep and the notebook
share, resume and reuse each other's runs.

Teacher features: one Ray task per combination runs the teacher once over the train split and builds the feature
and logit cache of every method that needs one (the cache notebook 5 shares between its runs); it goes into Ray's
object store, which copies it at most once to each node, where every student task of that combination maps the
same shared memory (zero-copy) instead of running the teacher again. On a GPU a student task copies it onto its
GPU when it fits in 60% of the free memory (distill's own rule), else reads it from the node's shared memory.

Resumable: a rerun skips combinations whose notebooks 1-3 finished with the same settings (their manifest says so)
and reuses finished student checkpoints; an interrupted student resumes after its last epoch. A failing task is
reported with its combination, method, seed and error, and the others go on. Collected: ROOT/sweep.json and
ROOT/sweep.md hold the grid (rows dataset x pair, columns methods, mean ± std over seeds, gain over CE),
ROOT/figures/<dataset>.png the paper-format figure per dataset, and each combination's folder its own
results.json / results.md / figures like the sequential pipeline's.

Every node must see ROOT and the data folder at the same path (one machine, or a shared filesystem such as NFS):
Ray moves the teacher cache between nodes, not checkpoints. Ray itself is imported only when a sweep runs.

This module holds the driver (run_sweep: locks, Ray resources, submitting and collecting tasks), the grid report
(sweep.md, the figures) and the command line; the tasks' bodies are kdutils.sweep_tasks. Called by its CLI and
benchmarks/sweep_bench.py.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from kdutils.checkpoints import checkpoint_finished
from kdutils.distill import REGISTRY
from kdutils.pipeline import parse_value
from kdutils.presets import PAIRS, PRESETS
from kdutils.report import save_figure
from kdutils.results import RESULTS_FILE, results_markdown
from kdutils.rundir import default_data_root, default_run_dir, run_lock, shown_path, write_atomic, write_json_atomic
from kdutils.sweep_tasks import (build_teacher_cache, cell_results, needs_teacher_cache, prepare_combination,
                                 student_checkpoint, sweep_cells, task_error, teacher_done, train_student)

SWEEP_JSON, SWEEP_MD = "sweep.json", "sweep.md"


# ----------------------------------------------------------------------------------------------------------------
# the grid report

def _percent(row: dict, key: str) -> str:
    """'mean ± std' in percent for a results row (mean only, marked, for one seed)."""
    mean, std = 100 * row[f"{key}_acc_mean"], 100 * row[f"{key}_acc_std"]
    return f"{mean:.2f} ± {std:.2f}" if row["seeds"] > 1 else f"{mean:.2f}"


def grid_markdown(sweep: dict) -> str:
    """sweep.md: the grid (rows dataset x pair, columns methods) at the final and best epoch, runs and failures."""
    methods = sweep["methods"]
    seeds = ", ".join(map(str, sweep["seeds"]))
    lines = [f"# Sweep: preset `{sweep['preset']}`, seeds {seeds}", "",
             f"Status: {sweep['status']}. Student runs: " + ", ".join(f"{n} {s}" for s, n in sweep["counts"].items())
             + f". Wall time {sweep['wall_seconds']:.0f} s on Ray ({sweep['resources']}).", ""]
    for key, what in (("final", "final epoch (headline)"), ("best", "best epoch (the paper's protocol)")):
        lines += [f"## Test accuracy, {what}", "",
                  "In %, mean ± sample std over seeds (a mean alone: one seed); in brackets the gain over `ce` in "
                  "points. Blank: the method did not finish for every seed.", "",
                  "| dataset | pair | teacher | " + " | ".join(methods) + " |",
                  "|---|---|---|" + "---|" * len(methods)]
        for cell in sweep["cells"]:
            res = cell["results"]
            row = [cell["dataset"], cell["pair"], "" if res is None else f"{100 * res['teacher']['test_acc']:.2f}"]
            ms = {} if res is None else res["methods"]
            ce = ms.get("ce", {}).get(f"{key}_acc_mean")
            for m in methods:
                if m not in ms:
                    row.append("")
                    continue
                gain = "" if ce is None or m == "ce" else f" ({100 * (ms[m][f'{key}_acc_mean'] - ce):+.2f})"
                row.append(_percent(ms[m], key) + gain)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Methods: " + ", ".join(f"`{m}` ({REGISTRY[m].label})" for m in methods) + ".", ""]
    if sweep["failures"]:
        lines += ["## Failures", "", "| dataset | pair | stage | method | seed | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {f['dataset']} | {f['pair']} | {f['stage']} | {f.get('method') or ''} | "
                  f"{'' if f.get('seed') is None else f['seed']} | {f['error'].replace('|', '/')} |"
                  for f in sweep["failures"]]
        lines.append("")
    return "\n".join(lines)


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically (a temporary file in its folder, then a rename)."""
    return write_atomic(path, lambda f: f.write(text), mode="w")


def write_figures(root: Path, sweep: dict) -> list[Path]:
    """ROOT/figures/<dataset>.png: the paper-format result grid (one panel per pair) of each dataset with a CE row."""
    from kdutils.result_plots import plot_result_grid
    paths = []
    for dataset in dict.fromkeys(c["dataset"] for c in sweep["cells"]):
        cells = {(c["dataset"], c["pair"]): c["results"] for c in sweep["cells"]
                 if c["dataset"] == dataset and c["results"] and "ce" in c["results"]["methods"]}
        if cells:
            paths.append(save_figure(plot_result_grid(cells), root / "figures" / f"{dataset}.png"))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# the driver

class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: what finished, and that the same command resumes."""


def _check_resources(resources: list[dict], need: dict[str, float]) -> None:
    """Refuse a task shape no Ray node can host (Ray would otherwise wait for it forever)."""
    for name, amount in need.items():
        largest = max((r.get(name, 0.0) for r in resources), default=0.0)
        if amount > largest:
            flag = {"CPU": "--threads / --teacher-threads", "GPU": "--gpus-per-student"}[name]
            raise ValueError(f"a sweep task asks for {amount:g} {name}(s) but the largest Ray node has {largest:g}; "
                             f"lower {flag} (or add a bigger node to the cluster).")


def run_sweep(root: str | Path, preset: str, datasets: Sequence[str], pairs: Sequence[str], seeds: Sequence[int],
              params: dict | None = None, *, device: str = "auto", gpus_per_student: float = 1.0, threads: int = 1,
              teacher_threads: int = 2, data_root: str | Path | None = None, cache_mb: float | None = None,
              address: str | None = None, figures: bool = True, progress: bool = True) -> dict:
    """Run the grid on Ray (the running instance, else `address`, else a new local one); write sweep.json/.md."""
    import ray
    log = print if progress else (lambda *a, **k: None)
    root = Path(root).resolve()
    data_root = str(Path(data_root).expanduser().resolve()) if data_root else str(default_data_root())
    cells = sweep_cells(root, preset, datasets, pairs, seeds, {**(params or {}), "data_root": data_root})
    if threads < 1 or teacher_threads < 1:
        raise ValueError(f"--threads and --teacher-threads must be >= 1; got {threads} and {teacher_threads}.")
    if not 0 < gpus_per_student <= 1:
        raise ValueError(f"--gpus-per-student must be in (0, 1], e.g. 0.25 for four small students per GPU; "
                         f"got {gpus_per_student}.")
    with contextlib.ExitStack() as held:  # one run per folder: the root and each combination (run_lock)
        for folder in (root, *(Path(c["run_dir"]) for c in cells)):
            held.enter_context(run_lock(folder, "sweep folder"))
        locks = held.pop_all()             # released when the sweep ends, below
    started_ray = not ray.is_initialized()
    if started_ray:
        try:
            ray.init(address=address)
        except Exception as err:      # Ray raises a bare Exception when its node misses a start-up timeout
            locks.close()
            raise RuntimeError(f"Ray could not {'join ' + address if address else 'start a local instance'} ({err}). "
                               f"On a busy machine Ray's agents can miss its fixed start-up timeouts: run again, or "
                               f"start Ray once with `ray start --head` and pass --address auto.") from err
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        if device == "auto":
            device = "cuda" if total.get("GPU", 0) > 0 else "cpu"
        if device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu; got {device!r}.")
        if device == "cuda":
            teacher_opts = {"num_gpus": 1, "num_cpus": teacher_threads}
            student_opts = {"num_gpus": gpus_per_student, "num_cpus": threads}
        else:
            teacher_opts, student_opts = {"num_cpus": teacher_threads}, {"num_cpus": threads}
        for opts in (teacher_opts, student_opts):
            _check_resources(nodes, {"CPU": opts["num_cpus"], **({"GPU": opts["num_gpus"]} if "num_gpus" in opts
                                                                 else {})})
        where = f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
        share = f"{gpus_per_student:g} GPU and " if device == "cuda" else ""
        n_runs = sum(len(c["config"]["methods"]) * len(c["config"]["seeds"]) for c in cells)
        log(f"sweep: {len(cells)} combination(s), {n_runs} student runs on Ray ({where}); device {device}, "
            f"{share}{threads} CPU thread(s) per student run; root {root}", flush=True)
        return _drive(ray, root, cells, data_root, device, threads, teacher_threads, cache_mb,
                      teacher_opts, student_opts, where, figures, log)
    finally:
        locks.close()
        if started_ray:
            ray.shutdown()


def _drive(ray: Any, root: Path, cells: list[dict], data_root: str, device: str, threads: int,
           teacher_threads: int, cache_mb: float | None, teacher_opts: dict, student_opts: dict, where: str,
           figures: bool, log: Callable[..., None]) -> dict:
    """Submit the teacher, cache and student tasks, collect them as they finish, and write the sweep's files."""
    start = time.perf_counter()
    prepare = ray.remote(prepare_combination)
    build = ray.remote(build_teacher_cache)
    train = ray.remote(train_student)
    pending: dict = {}          # ObjectRef -> (stage, cell, method, seed)
    caches: dict = {}           # cell key -> the cache's ObjectRef, dropped when the cell is done
    left = {c["key"]: len(c["config"]["methods"]) * len(c["config"]["seeds"]) for c in cells}
    runs: dict = {}             # (cell key, method, seed) -> the task's record
    failures: list[dict] = []
    n_runs, done = sum(left.values()), 0
    first = cells[0]["config"]

    def submit_students(cell: dict) -> None:
        config, run_dir = cell["config"], cell["run_dir"]
        todo = {(m, s) for m in config["methods"] for s in config["seeds"]
                if not checkpoint_finished(student_checkpoint(run_dir, m, s), config["student_epochs"])}
        cached = [m for m in config["methods"] if needs_teacher_cache(m, config) and any(t[0] == m for t in todo)]
        if cached:
            caches[cell["key"]] = build.options(name=f"teacher cache {cell['key']}", **student_opts).remote(
                run_dir, config, cached, data_root, device, threads, cache_mb)
        log(f"[{cell['key']}] student runs: {len(todo)} to train, {left[cell['key']] - len(todo)} finished "
            f"(reused); teacher cache for {', '.join(cached) or 'no method'}", flush=True)
        for seed in config["seeds"]:
            for method in config["methods"]:
                cache = caches[cell["key"]] if method in cached and (method, seed) in todo else None
                ref = train.options(name=f"student {cell['key']} {method} seed {seed}", **student_opts).remote(
                    run_dir, config, method, seed, data_root, device, threads, cache, cache_mb)
                pending[ref] = ("student", cell, method, seed)

    def record_failure(cell: dict, stage: str, method: str | None, seed: int | None, error: str) -> None:
        failures.append({"dataset": cell["dataset"], "pair": cell["pair"], "combination": cell["key"],
                         "stage": stage, "method": method, "seed": seed, "error": error})

    def collect(status: str) -> dict:
        counts = {s: sum(r["status"] == s for r in runs.values()) for s in ("trained", "resumed", "reused", "failed")}
        counts["not run"] = n_runs - len(runs)
        sweep = {
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "status": status, "preset": first["preset"], "root": str(root),
            "datasets": list(dict.fromkeys(c["dataset"] for c in cells)),
            "pairs": list(dict.fromkeys(c["pair"] for c in cells)),
            "methods": first["methods"], "seeds": first["seeds"], "device": device,
            "threads_per_student": threads, "resources": where, "student_task": student_opts,
            "wall_seconds": time.perf_counter() - start, "counts": counts,
            "cells": [{"dataset": c["dataset"], "pair": c["pair"], "run_dir": c["run_dir"],
                       "results": cell_results(c, runs)} for c in cells],
            "runs": [{"dataset": c["dataset"], "pair": c["pair"], "method": m, "seed": s,
                      **({k: v for k, v in runs[c["key"], m, s].items() if k != "history"}
                         if (c["key"], m, s) in runs else {"status": "not run"})}
                     for c in cells for s in c["config"]["seeds"] for m in c["config"]["methods"]],
            "failures": failures,
        }
        write_json_atomic(root / SWEEP_JSON, sweep)
        return sweep

    try:
        for cell in cells:
            if teacher_done(cell["run_dir"], cell["config"]):
                log(f"[{cell['key']}] teacher, geometry and KQ: finished before, skipped", flush=True)
                submit_students(cell)
            else:
                log(f"[{cell['key']}] teacher, geometry and KQ: submitted (notebooks 1-3)", flush=True)
                ref = prepare.options(name=f"teacher {cell['key']}", **teacher_opts).remote(
                    cell["run_dir"], cell["config"]["preset"], cell["params"], teacher_threads)
                pending[ref] = ("teacher", cell, None, None)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            stage, cell, method, seed = pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as err:
                error = task_error(err)
                record_failure(cell, stage, method, seed, error)
                if stage == "teacher":
                    log(f"[{cell['key']}] teacher, geometry and KQ FAILED: {error}; its "
                        f"{left[cell['key']]} student runs are not run", flush=True)
                    left[cell["key"]] = 0
                else:
                    done += 1
                    left[cell["key"]] -= 1
                    runs[cell["key"], method, seed] = {"status": "failed", "error": error}
                    log(f"[{done}/{n_runs}] {cell['key']} {method} seed {seed}: FAILED: {error}", flush=True)
            else:
                if stage == "teacher":
                    log(f"[{cell['key']}] teacher, geometry and KQ: finished in {value['seconds']:.0f} s", flush=True)
                    submit_students(cell)
                else:
                    done += 1
                    left[cell["key"]] -= 1
                    runs[cell["key"], method, seed] = {**value, "final_acc": value["history"][-1]["test_acc"],
                                                       "best_acc": max(r["test_acc"] for r in value["history"])}
                    log(f"[{done}/{n_runs}] {cell['key']} {method} seed {seed}: {value['status']} in "
                        f"{value['seconds']:.1f} s, final {value['history'][-1]['test_acc']:.2%} "
                        f"(node {value['node']}, {value['device']}, {value['threads']} thread(s))", flush=True)
            if left[cell["key"]] == 0:
                caches.pop(cell["key"], None)           # frees the teacher cache in the object store
                results = cell_results(cell, runs)
                if results is not None and set(results["methods"]) == set(cell["config"]["methods"]):
                    write_json_atomic(Path(cell["run_dir"]) / RESULTS_FILE, results)
                    write_text(Path(cell["run_dir"]) / "results.md", results_markdown(results))
                    if figures and "ce" in results["methods"]:     # the figures show gains over the CE student
                        from kdutils.report import write_report
                        write_report(cell["run_dir"])
            collect("running")
    except KeyboardInterrupt:
        sweep = collect("interrupted")
        c = sweep["counts"]
        raise SweepInterrupted(f"sweep interrupted ({c['trained'] + c['resumed'] + c['reused']} of {n_runs} student "
                               f"runs finished, {c['failed']} failed); run the same command again to resume: "
                               f"finished teachers and student checkpoints are reused, interrupted runs continue "
                               f"after their last completed epoch.") from None
    sweep = collect("complete" if not failures else "finished with failures")
    write_text(root / SWEEP_MD, grid_markdown(sweep))
    written = [root / SWEEP_JSON, root / SWEEP_MD, *(write_figures(root, sweep) if figures else [])]
    c = sweep["counts"]
    log(f"sweep: {n_runs} student runs: " + ", ".join(f"{n} {s}" for s, n in c.items()) +
        f" in {sweep['wall_seconds']:.0f} s; wrote {', '.join(shown_path(p) for p in written)}", flush=True)
    for f in failures:
        log(f"  failed: {f['combination']} {f['stage']}"
            f"{'' if f['method'] is None else ' ' + f['method'] + ' seed ' + str(f['seed'])}: {f['error']}")
    return sweep


# ----------------------------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m kdutils.sweep`."""
    parser = argparse.ArgumentParser(
        prog="python -m kdutils.sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the paper's grid (datasets x pairs x methods x seeds) on Ray: notebooks 1-3 once per "
                    "(dataset, pair), then every (method, seed) student run as its own Ray task. Resumable (rerun "
                    "the same command); results in ROOT/sweep.json, ROOT/sweep.md and ROOT/figures/<dataset>.png. "
                    "Needs Ray: pip install -e \".[sweep]\".",
        epilog="Examples:\n"
               "  python -m kdutils.sweep --preset quick --seeds 0 1          # CPU smoke run, local Ray\n"
               "  python -m kdutils.sweep --datasets cifar10 cifar100 --pairs resnet34-resnet9 vgg19-vgg11 \\\n"
               "      --seeds 0 1 2 --gpus-per-student 0.25                   # all GPUs of this machine\n"
               "  ray start --head; python -m kdutils.sweep ... --address auto  # an existing Ray cluster\n\n"
               "Every Ray node must see --root and --data-root at the same path (one machine or a shared "
               "filesystem).\nPresets, pairs, methods and -p keys: python -m kdutils.pipeline --list-presets")
    parser.add_argument("--preset", default="cifar10", choices=list(PRESETS),
                        help="base settings of every combination (default cifar10: the paper's 50-epoch recipe; "
                             "quick for a CPU smoke run)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="datasets (or .npz paths); default: the preset's")
    parser.add_argument("--pairs", nargs="+", metavar="PAIR", choices=list(PAIRS),
                        help=f"teacher-student pairs ({', '.join(PAIRS)}); default: the preset's")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="student seeds; default: the preset's")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="student methods; default: the preset's")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override any other preset key, as in kdutils.pipeline (repeatable)")
    parser.add_argument("--root", type=Path, help="sweep folder, one run dir per combination (default runs/sweep-PRESET)")
    parser.add_argument("--data-root", type=Path, help="dataset folder (default: the project's data/)")
    parser.add_argument("--address", help="Ray cluster to join, e.g. auto (default: start a local Ray instance)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: cuda when the Ray cluster has GPUs, else cpu")
    parser.add_argument("--gpus-per-student", type=float, default=1.0, metavar="F",
                        help="GPU share of one student run, 0 < F <= 1 (default 1; e.g. 0.25 runs four small "
                             "students per GPU)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads (Ray CPUs) of one student run (default 1)")
    parser.add_argument("--teacher-threads", type=int, default=2, metavar="N",
                        help="CPU threads (Ray CPUs) of one combination's notebooks 1-3 (default 2)")
    parser.add_argument("--cache-mb", type=float, metavar="MB",
                        help="teacher cache budget per combination (default: distill's, 4096 MB on the CPU, "
                             "60%% of free GPU memory)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures (tables and JSON only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 all runs finished, 1 some failed, 2 bad arguments, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print('error: the sweep needs Ray: pip install -e ".[sweep]" (or pip install "ray>=2.9")', file=sys.stderr)
        return 1
    try:
        params = {name: parse_value(value) for name, value in args.parameter}
        if args.methods:
            params["methods"] = args.methods
        base = PRESETS[args.preset]
        root = args.root or default_run_dir(f"sweep-{args.preset}")
        sweep = run_sweep(root, args.preset, args.datasets or [base["dataset"]], args.pairs or [base["pair"]],
                          args.seeds or base["seeds"], params, device=args.device,
                          gpus_per_student=args.gpus_per_student, threads=args.threads,
                          teacher_threads=args.teacher_threads, data_root=args.data_root, cache_mb=args.cache_mb,
                          address=args.address, figures=not args.no_figures, progress=not args.no_progress)
    except ValueError as err:
        parser.error(str(err))
    except KeyboardInterrupt as err:
        print(str(err) if isinstance(err, SweepInterrupted) else "interrupted; run the same command again to resume.",
              file=sys.stderr)
        return 130
    except (FileNotFoundError, RuntimeError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if not sweep["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
