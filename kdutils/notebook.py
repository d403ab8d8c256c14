"""What every notebook does before its own work: one `setup` call, Colab handling, and the repository URL.

Called by every notebook (setup, legends_outside) and by its command line, `python -m kdutils.notebook`.

Each notebook's first code cell after `parameters` is

    from kdutils.notebook import setup
    config, run_dir, data_root, device, seed = setup(globals(), "04_distill_without_ce.ipynb")

`setup` resolves the preset and overrides from the notebook's parameters (`preset`, `run_dir`, `data_root` and
every preset key, exactly as `presets.resolve_config(preset, **presets.config_overrides(globals()))` would),
creates `run_dir`, picks the device and the first seed, prints one line, and checks the notebook's inputs
(`INPUTS`; pass `needs=[("file", "NN_producer.ipynb"), ...]` for a notebook not listed there). A missing input
raises "missing X: run notebooks/NN first" -- except on Google Colab, where each notebook opened from its badge gets
a fresh runtime: there `ensure_inputs` runs the earlier notebooks headless into the same `run_dir`
(`pipeline.run_pipeline(..., notebooks=[...])`, fetching the notebooks from the repository when they are not on
disk). `run_dir="drive:kd-without-ce/runs/colab"` keeps the run on Google Drive (mounted on first use), so later
notebooks, or a later session, find it.

Colab detection is `kdutils.presets.on_colab(override)`: `"google.colab" in sys.modules` unless `override` is
True/False; every function that depends on it takes that override as its `colab` parameter (tests pass it, nothing
reads hidden environment switches). On Colab, `preset="auto"` resolves to the `colab` preset (presets.preset_name).

The repository URL lives in pyproject.toml ([project.urls] Repository); `repository_url()` reads it, and
`python -m kdutils.notebook --set-url URL` (a fork) or `--sync-urls` rewrites the Colab badges and install lines
of every notebook from it; `--check` exits 1 when a notebook disagrees.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import sys
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kdutils import checks, pipeline, presets, rundir, runtime
from kdutils.precision import describe, precision_for
from kdutils.presets import on_colab
from kdutils.train import default_device

DEFAULT_URL = "https://github.com/kd-without-ce/kd-without-ce"
DEFAULT_REF = "main"          # the git ref the badges and install lines point at
DRIVE_PREFIX = "drive:"       # run_dir="drive:path/in/MyDrive" keeps the run on Google Drive (Colab)
DRIVE_MOUNT = "/content/drive"

# notebook -> the artifacts in run_dir it reads, each with the notebook that writes it
INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "01_train_teacher.ipynb": (),
    "02_probe_layer_geometry.ipynb": (("teacher.pt", "01_train_teacher.ipynb"),),
    "03_compute_kq.ipynb": (("teacher.pt", "01_train_teacher.ipynb"),),
    "04_distill_without_ce.ipynb": (("teacher.pt", "01_train_teacher.ipynb"),
                                    ("kq_layers.json", "03_compute_kq.ipynb")),
    "05_compare_to_hinton_kd.ipynb": (("teacher.pt", "01_train_teacher.ipynb"),
                                      ("teacher_metrics.json", "01_train_teacher.ipynb"),
                                      ("kq_layers.json", "03_compute_kq.ipynb")),
    "06_validate_kq.ipynb": (("teacher.pt", "01_train_teacher.ipynb"),
                             ("kq_layers.json", "03_compute_kq.ipynb"),
                             ("results.json", "05_compare_to_hinton_kd.ipynb")),
}


class Setup(NamedTuple):
    """What `setup` returns (unpack it: `config, run_dir, data_root, device, seed = setup(...)`)."""

    config: dict
    run_dir: Path
    data_root: Path
    device: torch.device
    seed: int


# ----------------------------------------------------------------------------------------------------------------
# Colab

def mount_drive(mount_point: str = DRIVE_MOUNT) -> None:
    """Mount Google Drive at `mount_point` (Colab asks for permission once per runtime)."""
    from google.colab import drive  # only importable on Colab
    drive.mount(mount_point)


def resolve_run_dir(run_dir: str | Path | None, preset: str, *, colab: bool | None = None,
                    mount: Callable[[str], None] | None = None) -> Path:
    """The run directory: `run_dir`, or runs/<preset> when None; "drive:REST" is REST inside Google Drive's MyDrive
    (Colab only; Drive is mounted with `mount`, default mount_drive)."""
    if run_dir is None or run_dir == "":
        return rundir.default_run_dir(preset)
    text = str(run_dir)
    if not text.startswith(DRIVE_PREFIX):
        return Path(text).expanduser()
    if not on_colab(colab):
        raise ValueError(f"run_dir={text!r} asks for Google Drive, which only Colab can mount; pass a local folder "
                         f"(or None for runs/{preset}).")
    (mount or mount_drive)(DRIVE_MOUNT)
    return Path(DRIVE_MOUNT) / "MyDrive" / text[len(DRIVE_PREFIX):].lstrip("/")


def missing_inputs(run_dir: str | Path, notebook: str,
                   needs: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The (artifact, producing notebook) pairs of `notebook`'s inputs (INPUTS, or `needs`) missing from run_dir."""
    needs = INPUTS.get(notebook, ()) if needs is None else needs
    return [(name, producer) for name, producer in needs if not (Path(run_dir) / name).exists()]


def fetch_notebooks(names: Sequence[str], dest: str | Path, url: str | None = None, ref: str = DEFAULT_REF) -> Path:
    """Download notebooks/<name> of the repository at `ref` into `dest` (for a runtime that has only one notebook)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    owner_repo = (url or repository_url()).rstrip("/").removesuffix(".git").split("github.com/")[-1]
    for name in names:
        if not (dest / name).is_file():
            urllib.request.urlretrieve(f"https://raw.githubusercontent.com/{owner_repo}/{ref}/notebooks/{name}",
                                       dest / name)
    return dest


def ensure_inputs(run_dir: str | Path, notebook: str, config: dict, params: Mapping[str, Any] | None = None, *,
                  needs: Sequence[tuple[str, str]] | None = None, produce: bool | None = None,
                  colab: bool | None = None, notebooks_dir: str | Path | None = None) -> list[str]:
    """Check `notebook`'s inputs in run_dir; if some are missing, run the earlier notebooks that make them, or raise.

    With `produce` (default: on Colab) the notebooks from the first missing input's producer up to the one before
    `notebook` run headless into run_dir with the same preset and `params` (kdutils.pipeline.run_pipeline); the
    notebooks come from `notebooks_dir`, else the repository's notebooks/ folder, else are downloaded from the
    repository. Otherwise the first missing input raises rundir.require_artifact's "run notebook N first" error.
    Returns the names of the notebooks it ran.
    """
    missing = missing_inputs(run_dir, notebook, needs)
    if not missing:
        return []
    if not (on_colab(colab) if produce is None else produce):
        name, producer = missing[0]
        rundir.require_artifact(Path(run_dir) / name, producer, config["preset"])
    first = min(producer for _, producer in missing)
    earlier = [n for n in rundir.NOTEBOOKS if first <= n < notebook]
    if notebooks_dir is None:
        local = rundir.NOTEBOOKS_DIR
        notebooks_dir = local if all((local / n).is_file() for n in earlier) else \
            fetch_notebooks(earlier, rundir.project_base() / "kd-without-ce-notebooks")
    print(f"{notebook}: missing {', '.join(n for n, _ in missing)} in {rundir.shown_path(run_dir)}; running "
          f"{', '.join(earlier)} headless into it first (preset {config['preset']}).", flush=True)
    try:
        pipeline.run_pipeline(run_dir, config["preset"], dict(params or {}), notebooks_dir=notebooks_dir,
                              notebooks=earlier)
    except FileNotFoundError:      # the results table of a partial series; fine once the inputs exist
        if missing_inputs(run_dir, notebook, needs):
            raise
    return earlier


# ----------------------------------------------------------------------------------------------------------------
# the one setup call

def setup(namespace: Mapping[str, Any], notebook: str, *, needs: Sequence[tuple[str, str]] | None = None,
          colab: bool | None = None, produce: bool | None = None,
          mount: Callable[[str], None] | None = None) -> Setup:
    """Config, run_dir, data_root, device and seed of a notebook from its parameters (`globals()`), inputs checked.

    namespace: the notebook's globals: `preset`, optional `run_dir` (None: runs/<preset>; "drive:PATH": Google
    Drive on Colab), optional `data_root` (None: the project's data/), and the preset keys it overrides (None keeps
    the preset's value). notebook: its file name, e.g. "04_distill_without_ce.ipynb", whose inputs (INPUTS, or
    `needs` = [(artifact, producing notebook), ...]) must be in run_dir; on Colab (`colab`, default detected) or
    with produce=True, missing ones are made by running the earlier notebooks headless (ensure_inputs). Creates
    run_dir and prints one line: preset, device and its precision (kdutils.precision.describe), run_dir. For
    notebook 1, a `pretrained` teacher whose ImageNet weights cannot be loaded is decided here (one line says so;
    config holds pretrained False and pretrained_requested True, so its table shows what is trained); notebook 6's
    validation split and kq_samples are checked before anything trains (checks.check_validation_split,
    check_kq_samples).
    """
    config = presets.resolve_config(namespace.get("preset", "auto"), colab=colab,
                                    **presets.config_overrides(namespace))
    if notebook == rundir.VALIDATION_NOTEBOOK:  # before its single-layer sweep trains, not after it
        facts = checks.dataset_facts(config["dataset"])
        checks.check_validation_split(config, facts, notebook6=True)
        checks.check_kq_samples(config, facts)
    run_dir = resolve_run_dir(namespace.get("run_dir"), config["preset"], colab=colab, mount=mount)
    data_root = Path(namespace["data_root"]).expanduser() if namespace.get("data_root") else \
        rundir.default_data_root()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    params = {**presets.config_overrides(namespace),
              **({"data_root": str(data_root)} if namespace.get("data_root") else {})}
    ensure_inputs(run_dir, notebook, config, params, needs=needs, produce=produce, colab=colab)
    if notebook == rundir.NOTEBOOKS[0]:       # decided now, so the config table shows what is really trained
        why = checks.pretrained_fallback(config, run_dir)
        if why:
            print(f"The teacher's ImageNet weights cannot be loaded ({why}); {config['teacher']} is trained from "
                  f"scratch instead: pretrained False (pretrained_requested True).", flush=True)
            config = {**config, "pretrained": False, "pretrained_requested": True}
    print(f"preset {config['preset']} | device {device}, {describe(precision_for(device))} | run_dir "
          f"{rundir.shown_path(run_dir)}"
          + (" | on Colab" if on_colab(colab) else ""))
    print(provenance_text(config, presets.config_overrides(namespace), device))
    print(runtime.notebook_runtime_text(config, notebook), flush=True)
    return Setup(config, run_dir, data_root, device, config["seeds"][0])


def machine_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor()) and its usable cores."""
    name = ""
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name or platform.processor() or platform.machine()}, {cores} cores"


def reproduce_command(preset: str, overrides: Mapping[str, Any], notebook6: bool = True) -> str:
    """The pipeline command that runs the series with this preset and these overrides (paths as shown_path)."""
    def shown(v: Any) -> str:
        if isinstance(v, (list, dict)):
            return json.dumps(v, separators=(",", ":")).replace('"', "")
        if isinstance(v, str) and ("/" in v or v.endswith(".npz")):
            return rundir.shown_path(v)
        return str(v)
    args = "".join(f" -p {k} {shown(v)}" for k, v in overrides.items() if k != "preset")
    return f"python -m kdutils.pipeline --preset {preset}{args}" + (" --validate-kq" if notebook6 else "")


def provenance_text(config: dict, overrides: Mapping[str, Any], device: "torch.device") -> str:
    """Two lines naming the run: dataset, seeds, date, machine and torch; and the command that reproduces it."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine_name()
    return (f"run: dataset {rundir.shown_config(config)['dataset']}, seeds {config['seeds']}, {when}, {where}, "
            f"torch {torch.__version__}\nreproduce: {reproduce_command(config['preset'], overrides)}")


def legends_outside(fig: "matplotlib.figure.Figure", where: str = "right") -> "matplotlib.figure.Figure":
    """Move every axes' legend out of the plotting area (to the right, or below), so no legend covers a curve."""
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        size = legend.get_texts()[0].get_fontsize() if legend.get_texts() else 8
        handles, labels = ax.get_legend_handles_labels()
        if where == "below":
            ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=size, ncol=1,
                      frameon=False)
        else:
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=size)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# the repository URL: badges and install lines

def _pyproject() -> Path:
    """The project's pyproject.toml (next to the kdutils folder)."""
    return rundir.REPO_ROOT / "pyproject.toml"


def repository_url(pyproject: str | Path | None = None) -> str:
    """The repository URL: [project.urls] Repository of pyproject.toml, else the installed package's metadata."""
    path = Path(pyproject) if pyproject is not None else _pyproject()
    if path.is_file():
        try:
            import tomllib  # Python 3.11+
            found = tomllib.loads(path.read_text()).get("project", {}).get("urls", {}).get("Repository")
        except ImportError:  # Python 3.10: the one line we need
            match = re.search(r'(?m)^Repository = "([^"]+)"$', path.read_text())
            found = match and match.group(1)
        if found:
            return found.rstrip("/")
    from importlib.metadata import PackageNotFoundError, metadata
    try:
        for entry in metadata("kd-without-ce").get_all("Project-URL") or []:
            label, _, value = entry.partition(",")
            if label.strip().lower() == "repository":
                return value.strip().rstrip("/")
    except PackageNotFoundError:
        pass
    return DEFAULT_URL


def badge_link(notebook: str, url: str | None = None, ref: str = DEFAULT_REF) -> str:
    """The Colab URL that opens notebooks/<notebook> of the repository at `ref`."""
    repo = (url or repository_url()).rstrip("/").split("github.com/")[-1]
    return f"https://colab.research.google.com/github/{repo}/blob/{ref}/notebooks/{notebook}"


def install_spec(url: str | None = None, ref: str = DEFAULT_REF) -> str:
    """The pip requirement a Colab notebook installs: this package, with its colab extra, from git at `ref`."""
    return f"kd-without-ce[colab] @ git+{(url or repository_url()).rstrip('/')}@{ref}"


_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^\s)\"']+?/notebooks/(?P<name>[\w.-]+\.ipynb)")
_INSTALL = re.compile(r"kd-without-ce(?P<extra>\[\w+\])? @ git\+(?P<url>[^\s\"'@]+)@(?P<ref>[\w./-]+)")


def notebook_urls(path: str | Path) -> tuple[list[str], list[str]]:
    """The Colab badge links and the git+URL@ref of the pip install lines written in a notebook."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    return ([m.group(0) for m in _BADGE.finditer(text)],
            [f"git+{m.group('url')}@{m.group('ref')}" for m in _INSTALL.finditer(text)])


def sync_urls(url: str | None = None, notebooks_dir: str | Path = rundir.NOTEBOOKS_DIR,
              ref: str = DEFAULT_REF) -> list[Path]:
    """Rewrite the Colab badges and install lines of every notebook to `url` (default repository_url()) at `ref`;
    returns the notebooks that changed (only the touched cells' sources change)."""
    import nbformat
    url = url or repository_url()
    changed = []
    for path in sorted(Path(notebooks_dir).glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        dirty = False
        for cell in nb.cells:
            new = _BADGE.sub(lambda m: badge_link(m.group("name"), url, ref), cell.source)
            new = _INSTALL.sub(lambda m: install_spec(url, ref).replace("[colab]", m.group("extra") or ""), new)
            if new != cell.source:
                cell.source, dirty = new, True
        if dirty:
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def set_repository_url(url: str, pyproject: str | Path | None = None) -> Path:
    """Write `url` as Homepage and Repository in pyproject.toml's [project.urls] (a fork's one edit)."""
    path = Path(pyproject) if pyproject is not None else _pyproject()
    text = path.read_text()
    for key in ("Homepage", "Repository"):
        text, n = re.subn(rf'(?m)^{key} = "[^"]*"$', f'{key} = "{url.rstrip("/")}"', text)
        if n != 1:
            raise ValueError(f"{path} has no single `{key} = \"...\"` line under [project.urls].")
    path.write_text(text)
    return path


def with_preset(preset: str, out: str | Path, notebooks_dir: str | Path = rundir.NOTEBOOKS_DIR) -> list[Path]:
    """Copies of the notebooks in `out` with `preset = PRESET` injected after their parameters cell, as papermill
    injects parameters (notebooks without a `preset` parameter are copied unchanged); returns the copies' paths."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    presets.resolve_config(preset)                   # an unknown preset is refused here, not in a kernel
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(notebooks_dir).glob("*.ipynb")):
        nb = load_notebook_node(str(path))          # as papermill reads it (every cell gets a tags list)
        cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
        if cell is not None and re.search(r"^preset\s*=", cell.source, flags=re.M):
            nbformat.write(parameterize_notebook(nb, {"preset": preset}, report_mode=False), out / path.name)
        else:
            shutil.copyfile(path, out / path.name)
        written.append(out / path.name)
    return written


def publish_executed(run_dir: str | Path, notebooks_dir: str | Path = rundir.NOTEBOOKS_DIR) -> list[Path]:
    """Replace the committed notebooks by a pipeline run's executed copies (run_dir/executed/): the cell papermill
    injected (it holds the run's absolute run_dir) and papermill's metadata are dropped, everything else is kept.
    Refuses, before writing anything, a copy whose text still holds a machine path (the project's or the home
    folder's absolute path)."""
    import nbformat
    executed = sorted((Path(run_dir) / "executed").glob("0*.ipynb"))
    if not executed:
        raise FileNotFoundError(f"no executed notebooks in {Path(run_dir) / 'executed'}: run the pipeline first.")
    machine = [str(rundir.project_base().resolve()), str(Path.home())]
    cleaned = {}
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
        nb.metadata.pop("papermill", None)
        for c in nb.cells:
            c.metadata.pop("papermill", None)
            c.metadata.pop("execution", None)
        text = nbformat.writes(nb)
        leaks = [m for m in machine if m in text]
        if leaks:
            raise ValueError(f"{path.name} still holds machine paths ({', '.join(leaks)}): fix the cell that prints "
                             f"them (rundir.shown_path) and re-run it before publishing.")
        cleaned[path.name] = text
    out = []
    for name, text in cleaned.items():
        (Path(notebooks_dir) / name).write_text(text)
        out.append(Path(notebooks_dir) / name)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kdutils.notebook --set-url URL | --sync-urls | --check`: keep badges and install lines in step;
    `--with-preset PRESET --out DIR`: the notebooks with another preset, for CI."""
    parser = argparse.ArgumentParser(prog="python -m kdutils.notebook", description=main.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--set-url", metavar="URL", help="write URL into pyproject.toml, then sync the notebooks")
    group.add_argument("--sync-urls", action="store_true", help="rewrite the notebooks from pyproject.toml's URL")
    group.add_argument("--check", action="store_true", help="exit 1 if a notebook's badge or install line differs")
    group.add_argument("--with-preset", metavar="PRESET",
                       help="write copies of the notebooks with `preset = PRESET` injected after their parameters "
                            "cell (papermill's way) into --out, e.g. quick for CI's nbval step")
    group.add_argument("--publish", metavar="RUN_DIR", type=Path,
                       help="replace the committed notebooks by RUN_DIR/executed/ (injected cell and papermill "
                            "metadata dropped; refused if a machine path is left)")
    parser.add_argument("--out", type=Path, help="folder of the --with-preset copies")
    parser.add_argument("--notebooks-dir", type=Path, default=rundir.NOTEBOOKS_DIR)
    parser.add_argument("--ref", default=DEFAULT_REF, help="git ref of the badges and installs (default main)")
    args = parser.parse_args(argv)
    if args.publish:
        written = publish_executed(args.publish, args.notebooks_dir)
        print(f"{len(written)} notebook(s) published from {args.publish}")
        return 0
    if args.with_preset:
        if args.out is None:
            parser.error("--with-preset needs --out FOLDER")
        written = with_preset(args.with_preset, args.out, args.notebooks_dir)
        print(f"{len(written)} notebook(s) with preset {args.with_preset} in {args.out}")
        return 0
    if args.check:
        url = repository_url()
        bad = [str(p) for p in sorted(args.notebooks_dir.glob("*.ipynb"))
               for badges, installs in [notebook_urls(p)]
               if any(b != badge_link(b.rsplit("/", 1)[-1], url, args.ref) for b in badges)
               or any(i != f"git+{url}@{args.ref}" for i in installs)]
        print("\n".join(f"out of sync with {url}: {b}" for b in bad) or f"all notebooks use {url}")
        return 1 if bad else 0
    if args.set_url:
        set_repository_url(args.set_url)
    changed = sync_urls(args.set_url or repository_url(), args.notebooks_dir, args.ref)
    print(f"{len(changed)} notebook(s) rewritten" + "".join(f"\n  {p}" for p in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
