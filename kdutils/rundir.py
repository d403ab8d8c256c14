"""The run directory and the project's folders: the series' notebooks, where their artifacts go, how artifacts are
written (atomically), required and recorded (manifests), the series' data, and the lock that keeps two runs out of
one folder.

Called by every notebook (series_data loads its data; write_json_atomic, write_manifest and shown_path for what it
writes; require_artifact, teacher_config and shown_config in notebooks 5 and 6), by kdutils.notebook (setup's
folders and messages), kdutils.pipeline (the series, run_lock, the writability check), kdutils.sweep and
kdutils.sweep_tasks, kdutils.report, kdutils.presets and kdutils.runtime, and the benchmarks.

- The series: NOTEBOOKS (notebooks 1-5, in order), VALIDATION_NOTEBOOK (6, run with --validate-kq), NOTEBOOKS_DIR.
- Folders: default_run_dir (runs/<preset>), default_data_root (data/), shown_path / shown_config (paths as outputs
  print them: relative to the project folder, no machine paths).
- Artifacts: write_atomic / write_json_atomic (readers never see half a file), require_artifact (a clear "run
  notebook N first" error), write_manifest (config, seeds, versions, device, precision, git commit, artifact hashes
  and the data's fingerprint in run_dir/manifests/), teacher_config (what notebook 1 really trained).
- run_lock: run_dir/run.lock held for a whole run, so a second run into the same folder is refused (RunDirBusy);
  check_writable refuses a folder that cannot be written before any kernel starts.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch

from kdutils.precision import precision_for
from kdutils.precision import record as precision_record
from kdutils.train import default_device, library_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
# The series: notebooks 1-5 run in this order, each reading what the earlier ones wrote into run_dir.
NOTEBOOKS = ("01_train_teacher.ipynb", "02_probe_layer_geometry.ipynb", "03_compute_kq.ipynb",
             "04_distill_without_ce.ipynb", "05_compare_to_hinton_kd.ipynb")
# Run after notebook 5 when asked (--validate-kq): does KQ pick the right layers?
VALIDATION_NOTEBOOK = "06_validate_kq.ipynb"


# ----------------------------------------------------------------------------------------------------------------
# the project's folders and paths as outputs show them

def project_base() -> Path:
    """The project folder for an editable install (it holds pyproject.toml), else the working directory (Colab)."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()


def default_run_dir(preset: str) -> Path:
    """Where a preset's artifacts go when no run_dir is given: runs/<preset> in the project folder."""
    return project_base() / "runs" / preset


def default_data_root() -> Path:
    """Where datasets live when no data_root is given: the project's data/ folder."""
    return project_base() / "data"


def shown_path(path: str | Path) -> str:
    """A path as notebooks print it: relative to the project folder when inside it or beside it (`../shared/...`),
    else as given (no machine paths in outputs)."""
    for path, base in ((Path(os.path.abspath(Path(path).expanduser())), Path(os.path.abspath(project_base()))),
                       (Path(path).expanduser().resolve(), project_base().resolve())):   # as given, then real
        if path.is_relative_to(base):
            return str(path.relative_to(base))
        if base.parent != Path(base.anchor) and path.is_relative_to(base.parent):
            return os.path.relpath(path, base)
    return str(path)


def shown_config(config: dict) -> dict:
    """`config` with a file-path `dataset` or `data_root` as shown_path prints it (for tables and results.json)."""
    out = dict(config)
    for key in ("dataset", "data_root"):
        value = out.get(key)
        if isinstance(value, str) and Path(value).expanduser().is_absolute():
            out[key] = shown_path(value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# run-directory artifacts

def write_atomic(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call write(file) on a temporary file beside `path`, then rename it to `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (write_atomic)."""
    return write_atomic(path, lambda f: (json.dump(obj, f, indent=2, default=str), f.write("\n")), mode="w")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(repo: str | Path = REPO_ROOT) -> dict | None:
    """The checked-out commit of `repo` and whether the work tree has changes, or None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, or no commit yet
        return None


def require_artifact(path: str | Path, notebook: str, preset: str | None = None) -> Path:
    """`path` if it exists, else a FileNotFoundError saying which notebook produces it (with `preset`, the preset
    the command it suggests must use)."""
    path = Path(path)
    if not path.exists():
        with_preset = f"with preset = {preset!r}, " if preset else ""
        flag = f"--preset {preset} " if preset else ""
        raise FileNotFoundError(f"missing {path}: run notebooks/{notebook} first ({with_preset}or the whole "
                                f"pipeline: python -m kdutils.pipeline {flag}--run-dir {path.parent}).")
    return path


def teacher_config(config: dict, run_dir: str | Path) -> dict:
    """`config` with `pretrained` set to what notebook 1 really used (run_dir/teacher_metrics.json), if it ran.

    A paper preset asks for an ImageNet-pretrained teacher; offline, notebook 1 trains it from scratch instead. Then
    `pretrained` becomes False and `pretrained_requested` True, so manifests and results record the real teacher.
    """
    path = Path(run_dir) / "teacher_metrics.json"
    if not path.is_file():
        return dict(config)
    used = bool(json.loads(path.read_text()).get("pretrained", config.get("pretrained")))
    out = {**config, "pretrained": used}
    if used != config.get("pretrained"):
        out["pretrained_requested"] = config.get("pretrained")
    return out


def write_manifest(run_dir: str | Path, notebook: str, config: dict, artifacts: dict[str, Path],
                   data: "kdutils.data.Dataset | None" = None) -> Path:
    """Record a notebook's config, seeds, versions, device and precision, git commit and artifact hashes in
    run_dir/manifests/.

    With `data` (the dataset the notebook worked on), also what it was: name, source (shown_path of a file), content
    fingerprint (kdutils.data.fingerprint, the one checkpoints record), split sizes, classes and image size.
    """
    run_dir = Path(run_dir)
    config = teacher_config(config, run_dir)
    files = {}
    for name, path in artifacts.items():
        path = require_artifact(path, notebook)
        shown = path.resolve().relative_to(run_dir.resolve()) if path.resolve().is_relative_to(run_dir.resolve()) \
            else path.resolve()
        files[name] = {"path": str(shown), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    device = default_device()
    manifest = {
        "notebook": notebook,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": config.get("preset"),
        "seeds": config.get("seeds"),
        "config": config,
        "versions": library_versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "precision": precision_record(precision_for(device)),
        "git": git_commit(),
        "artifacts": files,
    }
    if data is not None:
        from kdutils.data import fingerprint
        from kdutils.datasets import DATASETS
        source = data.source if data.source in DATASETS or not data.source else shown_path(data.source)
        manifest["data"] = {"name": data.name, "source": source, "fingerprint": fingerprint(data),
                            "num_train": data.num_train, "num_test": len(data.y_test),
                            "num_classes": data.num_classes, "image_size": data.image_size}
    return write_json_atomic(run_dir / "manifests" / f"{Path(notebook).stem}.json", manifest)


def series_data(config: dict, data_root: str | Path | None = None, *, validation: bool = False):
    """The series' data: the config's dataset (per_class subset seeded by seeds[0]) without the held-out validation
    split (val_fraction of the training images), which every notebook trains on. With `validation`, returns
    (train, val) instead, val holding the held-out images as its test split (kdutils.data.split_validation); with
    val_fraction 0 (the paper's protocol) notebook 6 still needs one, so 10% of the training images are split off
    here (images the teacher trained on)."""
    from kdutils.data import load_dataset, split_validation
    seed = config["seeds"][0]
    data = load_dataset(config["dataset"], root=data_root if data_root is not None else default_data_root(),
                        per_class=config["per_class"], seed=seed)
    fraction = config.get("val_fraction", 0.0)
    if fraction > 0:
        train, val = split_validation(data, fraction, seed)
        return (train, val) if validation else train
    return split_validation(data, 0.1, seed) if validation else data


def write_hint(err: OSError) -> str:
    """What a failed write means and its fix, by errno (full disk, read-only or foreign folder), else ''."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk (or quota) holding it is full: free space, or choose another --run-dir"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "it is not writable (a read-only filesystem or another user's folder): choose another --run-dir"
    return ""


def check_writable(folder: Path) -> None:
    """Refuse a run directory this process cannot write into (read-only, full), before any kernel starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        hint = write_hint(err) or "choose another --run-dir (run_dir=)"
        raise RuntimeError(f"cannot write into the run directory {folder} ({err.strerror or err}): {hint}.") from None


# ----------------------------------------------------------------------------------------------------------------
# one run at a time per folder

LOCK_FILE = "run.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds a folder's lock (run.lock): two runs must not share a run directory."""


def _process_token(pid: int) -> str | None:
    """Boot id and start time of a running process (Linux /proc), to tell a reused pid from a lock's holder; None
    where /proc does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's live process
        return True
    try:                            # a zombie (ended, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _ancestors() -> set[int]:
    """This process and its parents' pids (from /proc; this process and its parent where /proc is missing)."""
    pids, pid = {os.getpid(), os.getppid()}, os.getppid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        pids.add(pid)
    return pids


def _read_lock(lock: Path) -> dict | None:
    """A lock file's record; None when it vanished; {} when it stays unreadable (being written, or damaged)."""
    for _ in range(20):
        try:
            record = json.loads(lock.read_text())
            if isinstance(record, dict) and "pid" in record:
                return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)              # its writer created it an instant ago and is writing it
    return {}


def _lock_state(record: dict) -> str:
    """'ours' (held by this process or an ancestor on this host), 'live', or 'stale' (its process has ended)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return "live"                 # another machine (a shared filesystem), or unreadable: cannot tell
    pid = record["pid"]
    if not _pid_alive(pid):
        return "stale"
    token = _process_token(pid)
    if record.get("token") and token and token != record["token"]:
        return "stale"                # the pid now belongs to another process
    return "ours" if pid in _ancestors() else "live"


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "run directory") -> Iterator[Path]:
    """Hold folder/run.lock for the block, so two runs never share a folder.

    The lock file records pid, host, start time and command, created atomically (O_CREAT | O_EXCL). A folder locked
    by a live process raises RunDirBusy naming it and since when; a lock left by a process that has ended on this
    machine is taken over (with a line saying so); a lock of this process or of an ancestor is re-entered (a
    notebook that runs earlier notebooks inside a pipeline run). The lock is removed on exit, Ctrl-C included.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": _process_token(os.getpid()),
          "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else ""}
    owned = False
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = _read_lock(lock)
            if record is None:
                continue                                    # released meanwhile: try again
            state = _lock_state(record) if record else "unreadable"
            if state == "ours":
                break
            if state == "stale":
                if _read_lock(lock) == record:              # still the same dead holder
                    lock.unlink(missing_ok=True)
                    print(f"{what} {shown_path(folder)}: taking over the lock of process {record['pid']} "
                          f"(started {record.get('started', '?')}), which has ended.", flush=True)
                continue
            holder = (f"process {record['pid']} on {record.get('host', '?')}"
                      f" ({record.get('command') or 'no command recorded'}), since {record.get('started', '?')}"
                      if record else "a lock file that cannot be read")
            raise RunDirBusy(f"{what} {folder} is in use by another run: {holder}. Wait for it to finish, or choose "
                             f"another folder (--run-dir); if that run is gone (a crash on another machine, say), "
                             f"delete {lock}.") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            owned = True
            break
    else:
        raise RunDirBusy(f"could not take the lock {lock}: it keeps changing hands; is another run starting there?")
    try:
        yield lock
    finally:
        if owned and (_read_lock(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)
