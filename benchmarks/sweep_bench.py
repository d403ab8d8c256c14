"""The Ray sweep against notebook 5's sequential loop on the `quick` preset; prints one JSON object.

Target: on a 2-core machine the sweep runs two student runs at a time with one thread each (Ray, num_cpus=2), and
should be clearly faster (speedup >= 1.3) than notebook 5's loop running the same runs one after another in one
process with torch's default thread count. Small students scale badly over intra-op threads, two processes do not.

    python benchmarks/sweep_bench.py [--seeds 0 1] [--student-epochs 4] [--root /tmp/sweep-bench]

Both sides start from the same teacher, geometry and KQ (notebooks 1-3, run once beforehand and not timed) and train
the same (method, seed) runs with the same distill call; `sweep_seconds` is the sweep's wall time after Ray is up
(its teacher cache, student tasks and collection; `ray_init_seconds` is separate), `sequential_seconds` the loop's
(data, teacher, cache and students). `identical` says whether the per-run final accuracies agree bit for bit; they
need not, as the two sides run different thread counts (see tests/test_sweep.py for the equal-thread check).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdutils import presets, rundir
from kdutils import sweep as sw
from kdutils import sweep_tasks
from kdutils.distill import distill, layer_arguments
from kdutils.train import load_model


def sequential_loop(run_dir: Path, config: dict, data_root: str) -> dict:
    """Notebook 5's loop (one cache dict, for seed: for method: distill), timed; final accuracy per run."""
    start = time.perf_counter()
    selection = json.loads((run_dir / "kq_layers.json").read_text())
    data = rundir.series_data(config, data_root)          # as notebook 5 and the sweep: without the validation split
    teacher = load_model(run_dir / "teacher.pt", expect_model=config["teacher"], num_classes=data.num_classes,
                         role="teacher")
    cache, final = {}, {}
    for seed in config["seeds"]:
        for method in config["methods"]:
            history = distill(teacher, config["student"], data, method, seed=seed, batch_size=config["batch_size"],
                              augment=config["augment"], cache=cache,
                              checkpoint=sweep_tasks.student_checkpoint(run_dir, method, seed), progress=False,
                              **presets.student_recipe(config), **layer_arguments(method, selection),
                              monitor=presets.monitored(config, method))
            final[f"{method}-seed{seed}"] = history[-1]["test_acc"]
    return {"seconds": time.perf_counter() - start, "final": final}


def main(argv: list[str] | None = None) -> int:
    """Prepare the teacher once, time the sequential loop, then the sweep; print the JSON comparison."""
    import ray
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="student seeds (default 0 1)")
    parser.add_argument("--student-epochs", type=int, default=presets.PRESETS["quick"]["student_epochs"])
    parser.add_argument("--teacher-epochs", type=int, default=presets.PRESETS["quick"]["teacher_epochs"])
    parser.add_argument("--root", type=Path, help="work folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    load_before = os.getloadavg()
    params = {"student_epochs": args.student_epochs, "teacher_epochs": args.teacher_epochs, "seeds": args.seeds}
    config = presets.resolve_config("quick", **params)
    data_root = str(rundir.default_data_root())
    prepared = root / "prepared"
    if not sweep_tasks.teacher_done(prepared, config):
        print(f"notebooks 1-3 into {prepared} (not timed)", file=sys.stderr, flush=True)
        sweep_tasks.prepare_combination(str(prepared), "quick", {**params, "data_root": data_root},
                                        torch.get_num_threads())

    sequential_dir = root / "sequential"
    shutil.rmtree(sequential_dir, ignore_errors=True)
    sequential_dir.mkdir(parents=True)
    for name in sweep_tasks.TEACHER_ARTIFACTS:
        shutil.copy(prepared / name, sequential_dir / name)
    threads = torch.get_num_threads()
    print(f"sequential loop, {threads} thread(s)", file=sys.stderr, flush=True)
    sequential = sequential_loop(sequential_dir, config, data_root)

    sweep_root = root / "sweep"
    shutil.rmtree(sweep_root, ignore_errors=True)
    cell_dir = sweep_tasks.combination_dir(sweep_root, config["dataset"], config["pair"])
    shutil.copytree(prepared, cell_dir, ignore=shutil.ignore_patterns("students"))
    t0 = time.perf_counter()
    ray.init(num_cpus=2)
    ray_init = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        result = sw.run_sweep(sweep_root, "quick", [config["dataset"]], [config["pair"]], args.seeds,
                              {k: v for k, v in params.items() if k != "seeds"}, threads=1, figures=False,
                              progress=False)
        sweep_seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    swept = {f"{r['method']}-seed{r['seed']}": r.get("final_acc") for r in result["runs"]}
    diffs = [abs(swept[k] - v) for k, v in sequential["final"].items() if swept.get(k) is not None]
    print(json.dumps({
        "benchmark": "sweep_vs_sequential_notebook5", "preset": "quick", "methods": config["methods"],
        "seeds": args.seeds, "student_epochs": args.student_epochs, "student_runs": len(sequential["final"]),
        "cpu_cores": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "sequential_seconds": round(sequential["seconds"], 1), "sequential_threads": threads,
        "sweep_seconds": round(sweep_seconds, 1), "sweep_parallel_runs": 2, "sweep_threads_per_run": 1,
        "ray_init_seconds": round(ray_init, 1), "speedup": round(sequential["seconds"] / sweep_seconds, 2),
        "speedup_with_ray_init": round(sequential["seconds"] / (sweep_seconds + ray_init), 2),
        "sweep_status": result["status"], "identical": bool(diffs) and max(diffs) == 0.0 and
        len(diffs) == len(sequential["final"]), "max_abs_diff_final_acc": max(diffs) if diffs else None,
        "target": "speedup >= 1.3 on 2 cores"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
