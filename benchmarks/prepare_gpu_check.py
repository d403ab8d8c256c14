"""Fill the git-ignored gpu_carry/ with what benchmarks/gpu_check.py needs on the GPU machine, and print the call.

    python benchmarks/prepare_gpu_check.py

- gpu_carry/cifar10-subset.npz: a copy of the shared CIFAR-10 subset (../shared/data/; never committed: the folder
  is git-ignored, and the device copies only the working tree and the carried paths);
- gpu_carry/wheels/: wheels of the packages the GPU machine's image lacks for the pipeline (papermill, nbformat,
  nbclient, ipykernel, jupyter_client and what they need), for its Python (3.12, x86-64 Linux), resolved by
  `pip download` from this machine's package index at the versions installed here; wheels of packages the image
  already holds (GPU_IMAGE_PACKAGES) are removed again, so its own numpy, torch, requests... stay in charge.

Then it checks that what travels (the working tree's tracked and untracked-not-ignored files, plus gpu_carry/)
fits the device's 64 MiB and prints the device call of gpu_check.py's docstring (command, carry, timeout_s).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:   # benchmarks/ is no package
    sys.path.insert(0, str(Path(__file__).resolve().parent))

TRAVEL_LIMIT_BYTES = 64 * 2**20
# What the pipeline needs beyond the image (pinned to the versions installed here; pip adds their needs).
TOP_LEVEL = ("papermill", "nbformat", "nbclient", "ipykernel", "jupyter_client")
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "linux_x86_64")
# Python packages of the GPU machine's image ('cuda'), as the device notes list them (read 2026-11-17).
GPU_IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> str:
    """The normalized distribution name of a wheel file (the part before its first '-')."""
    return normalize(Path(filename).name.split("-", 1)[0])


def split_wheels(files: list[Path], present: frozenset[str] = GPU_IMAGE_PACKAGES) -> tuple[list[Path], list[Path]]:
    """(wheels to carry, wheels to drop: the image holds their package); refuses two versions of one package."""
    seen: dict[str, Path] = {}
    for f in files:
        name = wheel_name(f.name)
        if name in seen:
            raise ValueError(f"two wheels of {name}: {seen[name].name} and {f.name}; one version of each is allowed "
                             f"(pip --target would stop): empty the wheels folder and run this again")
        seen[name] = f
    keep = [f for f in files if wheel_name(f.name) not in present]
    return keep, [f for f in files if wheel_name(f.name) in present]


def download_wheels(target: Path, packages: tuple[str, ...] = TOP_LEVEL) -> list[Path]:
    """pip download the packages (at the versions installed here) and their needs as wheels for the GPU machine's
    Python into `target` (emptied first); returns the wheels kept after dropping what the image holds."""
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here; install the project's test extras first: "
                             f"pip install -e '.[dev]'") from None
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
           "--implementation", "cp", "--abi", f"cp{TARGET_PYTHON.replace('.', '')}",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(target), *pins]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip download failed ({done.returncode}):\n{done.stderr[-3000:]}")
    keep, drop = split_wheels(sorted(target.glob("*.whl")))
    for f in drop:
        f.unlink()
    return keep


def travelling_bytes(root: Path = ROOT) -> int | None:
    """Bytes of the working tree that the device copies: tracked and untracked-not-ignored files (git ls-files);
    None where git cannot tell."""
    try:
        done = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = {root / p for p in done.stdout.decode().split("\0") if p}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_size(tree: int | None, carry: int, limit: int = TRAVEL_LIMIT_BYTES) -> str:
    """A line stating what travels; raises SystemExit naming the fix when it is over the device's limit."""
    total = carry + (tree or 0)
    line = (f"travels: {total / 2**20:.1f} MiB of {limit / 2**20:.0f} MiB (carry {carry / 2**20:.1f} MiB, working "
            f"tree {'unknown' if tree is None else f'{tree / 2**20:.1f} MiB'})")
    if total > limit:
        raise SystemExit(f"{line}: over the device's limit. Remove large untracked files from the working tree or "
                         f"git-ignore them, or carry fewer wheels.")
    return line


def device_call() -> dict:
    """The device tool's `run` arguments for the check (from gpu_check.py, whose docstring states them)."""
    import gpu_check
    return {"command": gpu_check.DEVICE_COMMAND, "carry": gpu_check.DEVICE_CARRY,
            "timeout_s": gpu_check.DEVICE_TIMEOUT_S}


def main(argv: list[str] | None = None) -> int:
    """Copy the data, download the wheels, check the size, print the call."""
    import gpu_check
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-subset.npz",
                   help="the shared CIFAR-10 subset (default ../shared/data/cifar10-subset.npz)")
    p.add_argument("--carry", type=Path, default=ROOT / gpu_check.CARRY_DIR,
                   help=f"the folder that travels (default {gpu_check.CARRY_DIR}/ in the project; git-ignored)")
    args = p.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"no dataset at {args.data}: pass --data PATH to the shared cifar10-subset.npz")
    from kdutils.data import load_dataset
    data = load_dataset(args.data, progress=False)      # refuses a broken file here, not on the GPU machine
    args.carry.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.data, args.carry / Path(gpu_check.CARRY_DATA).name)
    print(f"data: {data.num_train} train / {len(data.y_test)} test images, {data.num_classes} classes -> "
          f"{args.carry / Path(gpu_check.CARRY_DATA).name}")
    wheels = download_wheels(args.carry / Path(gpu_check.CARRY_WHEELS).name)
    print(f"wheels: {len(wheels)} ({sum(f.stat().st_size for f in wheels) / 2**20:.1f} MiB): "
          + ", ".join(f.name.split("-")[0] for f in wheels))
    print(check_size(travelling_bytes(), folder_bytes(args.carry)))
    print("device call (the device tool's run):")
    print(json.dumps(device_call(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
