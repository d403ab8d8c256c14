"""Whether extracting KQ's features in low precision changes the layer ranking: Q of every generalized layer of a
trained teacher with the precision rule's forward pass (kdutils.precision.precision_for, bf16 autocast +
channels_last on a CPU with native bf16) and with amp=False (fp32 NCHW), side by side in one JSON object.

Run from the project root on a finished run (notebook 1 wrote its teacher.pt):

    .venv/bin/python benchmarks/kq_precision.py --run-dir runs/cifar10-cpu --preset cifar10-cpu \
        --dataset ../shared/data/cifar10-subset.npz

The sample is the one notebook 3 uses (the preset's kq_samples / kq_per_class, seed = its first seed, on the
series' training split); KQ's statistics are fp32/fp64 either way, so only the forward pass differs. The JSON holds
Q per layer in both, the largest absolute and relative difference, both rankings and top-k selections, Spearman's
rho between the two Q vectors, and the seconds of each extraction.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scipy.stats import spearmanr

from kdutils import rundir
from kdutils.kq import layer_qualities, select_layers
from kdutils.precision import describe, precision_for
from kdutils.presets import resolve_config
from kdutils.train import load_model


def main(argv: list[str] | None = None) -> int:
    """Compare Q per layer of run_dir/teacher.pt extracted in the default precision and in fp32; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run directory holding teacher.pt")
    parser.add_argument("--preset", default="cifar10-cpu")
    parser.add_argument("--dataset", default=None, help="the run's dataset (an .npz path or a name)")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = resolve_config(args.preset, **({"dataset": args.dataset} if args.dataset else {}))
    data = rundir.series_data(config, args.data_root)
    teacher = load_model(args.run_dir / "teacher.pt", args.device, expect_model=config["teacher"],
                         num_classes=data.num_classes, role="teacher", data=data)
    out: dict = {"teacher": config["teacher"], "dataset": data.name, "samples": config["kq_samples"],
                 "per_class": config["kq_per_class"], "seed": config["seeds"][0], "k": config["k"]}
    tables = {}
    for name, amp in (("default", True), ("fp32", False)):
        start = time.perf_counter()
        tables[name] = layer_qualities(teacher, data, max_samples=config["kq_samples"],
                                       per_class=config["kq_per_class"], seed=config["seeds"][0], probe=False,
                                       device=args.device, cache_dir=None, progress=False, amp=amp)
        out[f"{name}_precision"] = describe(precision_for(args.device, amp))
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    q, q32 = tables["default"]["quality"].astype(float), tables["fp32"]["quality"].astype(float)
    out["quality"] = {int(i): [round(q[i], 5), round(q32[i], 5)] for i in q.index}
    out["max_abs_diff"] = round(float((q - q32).abs().max()), 6)
    out["max_rel_diff"] = round(float(((q - q32).abs() / q32.abs()).max()), 6)
    out["ranking"] = {n: [int(i) for i in t["quality"].astype(float).sort_values(ascending=False, kind="stable").index]
                      for n, t in tables.items()}
    out["top_k"] = {n: select_layers(t, k=config["k"]) for n, t in tables.items()}
    out["same_ranking"] = out["ranking"]["default"] == out["ranking"]["fp32"]
    out["same_top_k"] = out["top_k"]["default"] == out["top_k"]["fp32"]
    out["spearman"] = round(float(spearmanr(q.to_numpy(), q32.to_numpy()).statistic), 4)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
