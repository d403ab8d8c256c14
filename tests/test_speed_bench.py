"""benchmarks/speed_bench.py runs and reports both variants with consistent numbers (a tiny budget)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_bench_reports_both_variants():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_bench.py"), "--models", "resnet10_narrow",
                          "--batch", "8", "--steps", "1", "--rounds", "1", "--no-fit"], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout)
    row = result["models"]["resnet10_narrow"]
    fp32, default = row["fp32_nchw"], row["default"]
    assert fp32["images_per_s"] > 0 and default["images_per_s"] > 0
    # the speedup is the ratio of the two throughputs it is reported beside (rounding aside)
    assert abs(row["speedup"] - default["images_per_s"] / fp32["images_per_s"]) < 0.02 * row["speedup"] + 0.01
    assert result["matmul_peak_gflops"]["fp32"] > 0 and 0 < fp32["of_fp32_peak"] < 1.5
    assert result["default_precision"]["text"] == result["precision_text"]


def test_speed_bench_fit_section_compares_fit_with_the_plain_loop(shared_npz):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_bench.py"), "--models", "resnet10_narrow",
                          "--batch", "32", "--steps", "1", "--rounds", "1", "--fit-images", "256", "--fit-rounds", "1",
                          "--fit-models", "resnet10_narrow", "--fit-data", str(shared_npz)],
                         capture_output=True, text=True, check=True)
    fit = json.loads(out.stdout)["fit"]
    assert fit["images"] == 256 and fit["test_images"] == 64
    row = fit["models"]["resnet10_narrow"]
    ratio = row["fit_default"]["images_per_s"] / row["plain_fp32"]["images_per_s"]
    assert abs(row["speedup"] - ratio) < 0.02 * ratio + 0.01
    kd = fit["distill"]
    assert abs(kd["feature_kd_over_ce"] - kd["ce"]["images_per_s"] / kd["feature_kd"]["images_per_s"]) < 0.02
    assert set(fit["targets"]) == {"student_speedup", "feature_kd_over_ce"}      # no teacher timed here
    value, target, met = fit["targets"]["student_speedup"]
    assert (value, target, met) == (row["speedup"], 1.6, row["speedup"] >= 1.6)
    assert "epoch 1/1" in out.stderr and "epoch" not in out.stdout              # fit's logs stay out of the JSON


def test_cpu_name_reads_model_and_native_bf16_flags(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from speed_bench import cpu_name
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_name(info) == "AMD EPYC 9654 (avx512_bf16)"
    info.write_text("model name\t: Intel Xeon Platinum 8480+\nflags\t\t: avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_name(info) == "Intel Xeon Platinum 8480+ (amx_bf16, avx512_bf16)"
    info.write_text("model name\t: Intel Core i7-8700\nflags\t\t: avx2 fma\n")
    assert cpu_name(info) == "Intel Core i7-8700 (no native bf16 flag)"
    assert cpu_name(tmp_path / "absent") != ""              # off Linux: the platform's name, never an error
