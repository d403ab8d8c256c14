"""benchmarks/speed_bench.py runs and reports both variants with consistent numbers (a tiny budget)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_bench_reports_both_variants():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_bench.py"), "--models", "resnet10_narrow",
                          "--batch", "8", "--steps", "1", "--rounds", "1"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    row = result["models"]["resnet10_narrow"]
    fp32, default = row["fp32_nchw"], row["default"]
    assert fp32["images_per_s"] > 0 and default["images_per_s"] > 0
    # the speedup is the ratio of the two throughputs it is reported beside (rounding aside)
    assert abs(row["speedup"] - default["images_per_s"] / fp32["images_per_s"]) < 0.02 * row["speedup"] + 0.01
    assert result["matmul_peak_gflops"]["fp32"] > 0 and 0 < fp32["of_fp32_peak"] < 1.5
    assert result["default_precision"]["text"] == result["precision_text"]
