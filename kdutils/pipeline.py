"""The headless runner: notebooks 1-5 (6 with --validate-kq) through papermill, in order, stopping at the first failing
cell, and its command line.

    python -m kdutils.pipeline --preset quick --run-dir runs/quick -p student_epochs 2
    python -m kdutils.pipeline --list-presets

run_pipeline resolves the settings (kdutils.presets), checks before the first kernel starts what the notebooks would
refuse later (kdutils.checks: parameters, `parameters` cells, the dataset and whether the pair takes its images, the
validation split; kdutils.rundir: a writable run_dir), and holds run_dir/run.lock for the whole run
(kdutils.rundir.run_lock), so a second run into the same folder is refused; it ends by writing run_dir/results.md
(kdutils.results). Called by its CLI, kdutils.notebook (on Colab, to make a notebook's missing inputs),
kdutils.sweep_tasks (notebooks 1-3 of each combination) and the benchmarks.

papermill, nbformat and yaml are imported only by the runner and the CLI, so notebooks need none of them.

Each notebook runs in its own fresh kernel, as under Jupyter; the runner starts the next notebook's kernel while the
current one runs, and that kernel imports the course's modules before it answers (PRESTART_IMPORTS), so the next
set-up cell does not wait for torch, torchvision and matplotlib.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdutils.checks import (check_kq_samples, check_models, check_validation_split, dataset_facts,
                            has_parameters_cell, parameters_source, pretrained_fallback)
from kdutils.presets import PARAMETERS, PRESETS, describe_presets, preset_name, resolve_config
from kdutils.results import RESULTS_FILE, results_markdown
from kdutils.rundir import (NOTEBOOKS, NOTEBOOKS_DIR, VALIDATION_NOTEBOOK, check_writable, default_run_dir,
                            require_artifact, run_lock, write_hint)
from kdutils.runtime import GPU_PRESETS, runtime_estimate_text


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C during the pipeline: which notebooks finished, which was running, and that the same command resumes."""

    def __init__(self, finished: Sequence[str], running: str | None):
        done = ", ".join(Path(n).stem for n in finished) or "none"
        super().__init__(f"interrupted{f' during {Path(running).stem}' if running else ''} (finished: {done}). "
                         f"Run the same command again to resume: finished notebooks reload their checkpoints and "
                         f"caches, and training continues after the last completed epoch.")


class NotebookFailed(RuntimeError):
    """A pipeline notebook raised: the notebook, the failing cell, the error and the executed copy's path.

    `cell_index` counts the cells of the notebook as you open it (from 0, markdown cells included);
    `executed_cell_index` is papermill's index, which also counts the injected-parameters cell.
    """

    def __init__(self, notebook: str, executed: Path, cell_index: int | None, ename: str, evalue: str,
                 source: str = "", executed_cell_index: int | None = None):
        self.notebook, self.executed, self.cell_index, self.ename, self.evalue = \
            notebook, executed, cell_index, ename, evalue
        self.executed_cell_index = executed_cell_index
        first_line = next((line for line in source.splitlines() if line.strip()), "")
        if cell_index is None:        # the runner, the kernel or a file write failed, not a cell
            where = "outside its cells (the kernel or the runner)"
        else:
            where = f"in cell {cell_index}" + (f" ({first_line[:60]!r})" if first_line else "")
        copy = f"traceback in the executed copy {executed}" if Path(executed).is_file() else \
            "no executed copy was written"
        super().__init__(f"{notebook} failed {where}: {ename}: {evalue} ({copy})")


def _source_cell_index(notebook: Path, executed: Path, fallback: int | None) -> int | None:
    """Index in `notebook` of the cell papermill marked as failed in `executed` (matched by cell id)."""
    import nbformat
    try:
        failed = next(c.get("id") for c in nbformat.read(executed, as_version=4).cells
                      if c.metadata.get("papermill", {}).get("exception"))
        ids = [c.get("id") for c in nbformat.read(notebook, as_version=4).cells]
        return ids.index(failed) if failed is not None else fallback
    except (StopIteration, ValueError, OSError):  # no marked cell, or a notebook without cell ids
        return fallback


def _launches_current_python(argv: Sequence[str]) -> bool:
    """Whether a kernel spec's command starts sys.executable (jupyter_client maps a bare 'python' to it)."""
    exe = argv[0] if argv else ""
    bare = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    return exe in bare or (Path(exe).is_absolute() and Path(exe).parent == Path(sys.executable).parent
                           and Path(exe).name.startswith("python"))


def current_kernel_name() -> str:
    """The name of a Jupyter kernel spec that runs this interpreter ('python3' when it does)."""
    from jupyter_client.kernelspec import KernelSpecManager
    manager = KernelSpecManager()
    for name in sorted(manager.find_kernel_specs(), key=lambda n: n != "python3"):
        spec = manager.get_kernel_spec(name)
        if spec.language.lower() == "python" and _launches_current_python(spec.argv):
            return name
    raise RuntimeError(f"no Jupyter kernel runs {sys.executable}. Register one with "
                       f"`{sys.executable} -m ipykernel install --user --name kd-without-ce` "
                       "and pass --kernel kd-without-ce (kernel_name='kd-without-ce').")


def notebook_parameters(path: str | Path) -> dict[str, str]:
    """The names and default values (as source text) of a notebook's `parameters` cell: its top-level assignments,
    as papermill reads them (with Python's own parser here: papermill's import costs ~2 s before the first kernel)."""
    source = parameters_source(path)
    if source is None:
        return {}
    try:
        tree = ast.parse(source)
    except SyntaxError:             # IPython syntax in the cell: papermill's own reader
        import nbformat
        from papermill.translators import PythonTranslator
        return {p.name: p.default for p in PythonTranslator.inspect(nbformat.v4.new_code_cell(source))}
    out = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if isinstance(target, ast.Name):
            out[target.id] = ast.get_source_segment(source, node.value)
    return out


def absolute_paths(params: dict) -> dict:
    """`params` with a relative `data_root`, or a `dataset` given as a relative file path, made absolute (from cwd)."""
    out = dict(params)
    for key in ("dataset", "data_root"):
        value = out.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if key == "data_root" or value.lower().endswith(".npz") or "/" in value or Path(value).is_file():
            out[key] = os.path.abspath(Path(value).expanduser())   # symlinks kept: ../shared stays ../shared
    return out


def _kernel_manager_logging_to(log: Path) -> type:
    """A jupyter AsyncKernelManager class whose kernels write their own stderr (start-up warnings, the dying words
    of an interrupted kernel) to `log` instead of the terminal; cell outputs still reach the executed notebooks."""
    from jupyter_client import AsyncKernelManager

    class LoggingKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):  # noqa: D102 (jupyter_client's signature)
            with open(log, "ab") as stderr:  # the kernel inherits a duplicate of the descriptor
                await super().start_kernel(**{"stderr": stderr, **kw})
    return LoggingKernelManager


# What every notebook's set-up cell imports (torch, torchvision, matplotlib, pandas, scipy come with them): about
# 4 s per notebook on 2 cores, paid while the previous notebook runs instead, on CPU it leaves (_prestarted_kernel).
PRESTART_IMPORTS = ("kdutils.notebook", "kdutils.train", "kdutils.distill", "kdutils.kq", "kdutils.plots",
                    "kdutils.result_plots", "kdutils.validation", "kdutils.report", "matplotlib.pyplot")


def _prestarted_kernel(manager_class: type, kernel_name: str, cwd: Path) -> Any | None:
    """A kernel started now in `cwd` that imports PRESTART_IMPORTS before it answers, or None if it cannot start.

    The runner starts the next notebook's kernel while the current one runs, so the next set-up cell finds its
    modules imported. Each notebook still gets its own fresh process, and its namespace stays empty (the imports run
    in a throw-away dict, in a thread at SCHED_IDLE where the OS has it, so they take only CPU the current notebook
    leaves; see also _in_background). On None, papermill starts the kernel itself and reports any failure as usual."""
    from jupyter_core.utils import run_sync
    imports = "import " + ", ".join(PRESTART_IMPORTS)
    code = ("import os, threading\n"                      # the imports in a thread that only takes idle CPU
            "def _prestart():\n"
            "    if hasattr(os, 'SCHED_IDLE'):\n"
            "        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
            f"    exec({imports!r}, {{}})\n"
            "_t = threading.Thread(target=_prestart)\n_t.start()\n_t.join()")
    code = f"exec({code!r}, {{}})"
    manager = manager_class(kernel_name=kernel_name)
    try:
        run_sync(manager.start_kernel)(cwd=str(cwd), extra_arguments=[f"--IPKernelApp.exec_lines={code}"])
    except Exception:  # noqa: BLE001 (any failure: let papermill start the kernel and say why)
        return None
    return manager


def _in_background(manager: Any | None, background: bool) -> None:
    """Best effort, Linux: run a kernel's session at nice 19 while it prestarts, back at 0 when its notebook starts.

    jupyter starts each kernel in a session of its own, and Linux (autogroup, on by default) shares the CPU fairly
    between sessions, so a nice or idle thread inside the kernel does not yield to the current notebook: measured on
    2 cores, the next kernel's imports made a 0.3 s ce epoch take 4 s. Where /proc/<pid>/autogroup does not exist
    (autogroup off, macOS, Windows) this does nothing, and the idle import thread alone keeps out of the way."""
    pid = getattr(getattr(manager, "provisioner", None), "pid", None)
    if pid is None:
        return
    for _ in range(6):          # an unprivileged user may change an autogroup's nice once per 100 ms
        try:
            Path(f"/proc/{pid}/autogroup").write_text("19" if background else "0")
            return
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:
            return


def _shut_down(manager: Any | None) -> None:
    """Stop a prestarted kernel once its notebook has finished (a no-op for None or one already gone). Immediate:
    every cell has run and papermill has written the executed copy, so a polite shutdown would only cost ~2 s."""
    if manager is not None and manager.has_kernel:
        from jupyter_core.utils import run_sync
        try:
            run_sync(manager.shutdown_kernel)(now=True)
        except Exception:  # noqa: BLE001 (never hide the error or the Ctrl-C that brought us here)
            pass


def _drop_unknown_parameter_warnings(record: logging.LogRecord) -> bool:
    """Logging filter for papermill's logger: drop its 'Passed unknown parameter' warnings. run_pipeline gives every
    notebook all settings on purpose (setup reads each config key from globals, so all notebooks share one config),
    after checking every name against the config keys and the notebooks' parameters."""
    return not record.getMessage().startswith("Passed unknown parameter")


def run_pipeline(run_dir: str | Path, preset: str = "auto", params: dict | None = None,
                 notebooks_dir: str | Path = NOTEBOOKS_DIR, kernel_name: str | None = None,
                 log_output: bool = False, progress: bool = True, notebooks: Sequence[str] = NOTEBOOKS,
                 lock: bool = True) -> dict:
    """Execute the notebooks in order with papermill into run_dir/executed/, then tabulate run_dir/results.json.

    Everything that can be checked without a kernel is checked first: parameters, notebooks (names with or without
    .ipynb; each needs a `parameters` cell), the dataset (name, or an .npz file's contents), whether the pair takes
    its images, the validation split, and whether run_dir is writable. run_dir is locked for the whole run
    (run_lock: a second run into it is refused); `lock=False` when the caller already holds it (the sweep).
    """
    params = dict(params or {})
    reserved = sorted({"preset", "run_dir"} & set(params))
    if reserved:
        raise ValueError(f"pass {' and '.join(reserved)} as arguments of run_pipeline (--preset/--run-dir), "
                         "not as notebook parameters.")
    given = dict(params)             # as the user spelt them, for the messages of the checks below
    params = absolute_paths(params)  # the notebooks run with cwd=notebooks_dir, not the caller's directory
    config = resolve_config(preset, **{k: v for k, v in params.items() if k in PARAMETERS})
    notebooks_dir = Path(notebooks_dir).resolve()
    names = [n if Path(n).suffix == ".ipynb" else f"{n}.ipynb" for n in map(str, notebooks)]  # 01_train_teacher
    paths = [notebooks_dir / name for name in names]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        held = sorted(p.name for p in notebooks_dir.glob("*.ipynb")) if notebooks_dir.is_dir() else []
        raise FileNotFoundError(f"notebook(s) {', '.join(missing)} not found in {notebooks_dir} (it holds: "
                                f"{', '.join(held) or 'no notebooks'}); name them as listed (.ipynb may be left "
                                f"out), or pass notebooks_dir= (--notebooks-dir) if they live elsewhere.")
    untagged = [p.name for p in paths if not has_parameters_cell(p)]
    if untagged:
        raise ValueError(f"{', '.join(untagged)} has no cell tagged `parameters`: papermill would put --run-dir and "
                         f"every -p at its top, above the notebook's own settings, which would then win (it would "
                         f"write into its default run directory and ignore every setting given). Tag the cell that "
                         f"sets preset and run_dir with `parameters` (Jupyter: the cell's Tags; nbformat: "
                         f"cell.metadata['tags'] = ['parameters']).")
    declared_by = {p.name: notebook_parameters(p) for p in paths}
    declared = set().union(*declared_by.values())
    unknown = sorted(set(params) - set(PARAMETERS) - declared)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}: neither a config key ({', '.join(PARAMETERS)}) "
                         f"nor a parameter of the notebooks ({', '.join(sorted(declared)) or 'none'}).")
    if any("dataset" in d for d in declared_by.values()):     # notebooks that load the data
        facts = dataset_facts(given.get("dataset", config["dataset"]))
        check_models(config, facts)
        check_validation_split(config, facts, notebook6=VALIDATION_NOTEBOOK in names)
        if any("kq_samples" in d for d in declared_by.values()):
            check_kq_samples(config, facts)

    run_dir = Path(run_dir).resolve()  # absolute: the notebooks run with cwd=notebooks_dir
    taken = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise ValueError(f"the run directory {run_dir} cannot be created: {taken} is a file. Pass a folder to "
                         f"--run-dir (run_dir=).")
    check_writable(run_dir / "executed")
    kernel_name = kernel_name or current_kernel_name()
    parameters = {"preset": config["preset"], "run_dir": str(run_dir),
                  **({"progress": False} if "progress" in declared else {}), **params}  # one log line per epoch
    with run_lock(run_dir) if lock else contextlib.nullcontext():
        return _run_notebooks(run_dir, config, paths, parameters, notebooks_dir, kernel_name, log_output, progress)


def _run_notebooks(run_dir: Path, config: dict, paths: list[Path], parameters: dict, notebooks_dir: Path,
                   kernel_name: str, log_output: bool, progress: bool) -> dict:
    """run_pipeline's work once its checks passed: each notebook through papermill, then the results table."""
    kernel_log = run_dir / "executed" / "kernel.log"
    kernel_manager = _kernel_manager_logging_to(kernel_log)
    # the first kernel starts before papermill is imported (~2 s, with nbformat's schema validators)
    current, upcoming = None, _prestarted_kernel(kernel_manager, kernel_name, notebooks_dir)
    finished: list[str] = []
    papermill_log = logging.getLogger("papermill")
    try:                            # current: this notebook's kernel; upcoming: the next one's, started ahead
        import papermill
        from papermill.exceptions import PapermillExecutionError
        log = print if progress else (lambda *a, **k: None)
        log(f"pipeline: preset {config['preset']}, run dir {run_dir}, kernel {kernel_name} ({sys.executable})")
        why = pretrained_fallback(config, run_dir) if NOTEBOOKS[0] in {p.name for p in paths} else None
        if why:
            print(f"pipeline: the teacher's ImageNet weights cannot be loaded ({why}); notebook 1 trains "
                  f"{config['teacher']} from scratch instead (recorded as pretrained False, pretrained_requested "
                  f"True).", file=sys.stderr, flush=True)
        papermill_log.addFilter(_drop_unknown_parameter_warnings)
        for i, path in enumerate(paths, 1):
            executed = run_dir / "executed" / path.name
            log(f"[{i}/{len(paths)}] {path.name}: started", flush=True)
            start = time.perf_counter()
            current, upcoming = upcoming, None
            if i > 1:
                _in_background(current, False)
            if i < len(paths):
                upcoming = _prestarted_kernel(kernel_manager, kernel_name, notebooks_dir)
                _in_background(upcoming, True)
            try:
                papermill.execute_notebook(path, executed, parameters=parameters, kernel_name=kernel_name,
                                           language="python", cwd=str(notebooks_dir), log_output=log_output,
                                           progress_bar=progress, kernel_manager_class=kernel_manager,
                                           km=current, start_timeout=120)
            except KeyboardInterrupt:
                raise PipelineInterrupted(finished, path.name) from None
            except PapermillExecutionError as err:
                if err.ename == "KeyboardInterrupt":      # the kernel got the same Ctrl-C
                    raise PipelineInterrupted(finished, path.name) from None
                index = _source_cell_index(path, executed, fallback=err.cell_index)
                raise NotebookFailed(path.name, executed, index, err.ename, err.evalue, err.source,
                                     executed_cell_index=err.cell_index) from err
            except OSError as err:    # a file the runner could not write: the executed copy, the kernel's log
                hint = write_hint(err)
                raise NotebookFailed(path.name, executed, None, type(err).__name__,
                                     f"{err}" + (f": {hint}" if hint else "")) from err
            except Exception as err:  # kernel death, timeouts: still name the notebook and the kernel's own log
                logged = kernel_log.is_file() and kernel_log.stat().st_size > 0
                raise NotebookFailed(path.name, executed, None, type(err).__name__,
                                     f"{err}" + (f" (the kernel's log: {kernel_log})" if logged else "")) from err
            _shut_down(current)
            log(f"[{i}/{len(paths)}] {path.name}: finished in {time.perf_counter() - start:.1f} s", flush=True)
            finished.append(path.name)
    finally:
        papermill_log.removeFilter(_drop_unknown_parameter_warnings)
        for manager in (current, upcoming):
            _shut_down(manager)

    if NOTEBOOKS[4] not in {p.name for p in paths} and not (run_dir / RESULTS_FILE).exists():
        return {}                         # a partial series (e.g. notebooks 1-3): no results table yet
    results = json.loads(require_artifact(run_dir / RESULTS_FILE, paths[-1].name, config["preset"]).read_text())
    table = results_markdown(results)
    (run_dir / "results.md").write_text(table)
    print(table)
    return results


# ----------------------------------------------------------------------------------------------------------------
# command line

def parse_value(text: str) -> Any:
    """A -p value as papermill reads it (True/False/None/int/float, else str), plus [lists] and {dicts}."""
    literals = {"True": True, "False": False, "None": None}
    if text in literals:
        return literals[text]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{"):
        import yaml  # a papermill dependency; YAML also reads JSON and unquoted lists like [ce, hinton_kd]
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"could not parse {text!r} as a list/dict: {err}") from err
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m kdutils.pipeline`."""
    parser = argparse.ArgumentParser(
        prog="python -m kdutils.pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run notebooks 1-5 (and 6 with --validate-kq) headless with papermill, in order, stopping at "
                    "the first failing cell; executed copies go to RUN_DIR/executed/, the result table to "
                    "RUN_DIR/results.md.",
        epilog=describe_presets())
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="settings preset (default auto)")
    parser.add_argument("--run-dir", type=Path, help="where artifacts go (default runs/<preset>)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a preset key or pass a notebook parameter (repeatable)")
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help="folder holding the notebooks")
    parser.add_argument("--validate-kq", action="store_true",
                        help=f"also run {VALIDATION_NOTEBOOK} after the five (the single-layer sweep that tests KQ)")
    parser.add_argument("--notebooks", nargs="+", default=None, metavar="NAME",
                        help="run only these notebooks, in this order (default: notebooks 1-5)")
    parser.add_argument("--kernel", help="Jupyter kernel name (default: the one that runs this Python)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines or bars")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and parameters and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 a notebook or input failed, 2 bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        print(describe_presets())
        return 0
    try:
        params = {name: parse_value(value) for name, value in args.parameter}
        run_dir = args.run_dir or default_run_dir(preset_name(args.preset))
        if preset_name(args.preset) in GPU_PRESETS:     # from the dataset's real sizes (an .npz file is read)
            print(runtime_estimate_text(resolve_config(args.preset, **{k: v for k, v in params.items()
                                                                       if k in PARAMETERS})), flush=True)
        run_pipeline(run_dir, args.preset, params, notebooks_dir=args.notebooks_dir, kernel_name=args.kernel,
                     log_output=args.log_output, progress=not args.no_progress,
                     notebooks=args.notebooks or [*NOTEBOOKS, *([VALIDATION_NOTEBOOK] if args.validate_kq else [])])
    except ValueError as err:
        parser.error(str(err))
    except (NotebookFailed, OSError, RuntimeError) as err:     # OSError: FileNotFoundError, a failed write
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:      # one line, not a traceback through papermill's event loop
        # papermill's event loop may still hold a task that the interrupt cancelled mid-way; when it is collected,
        # asyncio would log a 5-line "Task exception was never retrieved" traceback after this line
        logging.getLogger("asyncio").disabled = True
        print(str(err) if isinstance(err, PipelineInterrupted) else
              "interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
