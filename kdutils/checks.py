"""The up-front checks: what a notebook would otherwise refuse only after its kernel has started, checked without a
kernel and without downloading anything, plus what the named datasets hold.

dataset_facts says what a dataset holds (a name from the tables below; an .npz file read and checked by
kdutils.data's own checks, so a missing, corrupt or malformed file is refused here); check_models (does the pair take
its images?), check_kq_samples and check_validation_split judge a config against it; has_parameters_cell checks a
notebook; pretrained_fallback says why notebook 1 will train its teacher from scratch. Called by
kdutils.pipeline.run_pipeline (before its first kernel), kdutils.notebook.setup (notebook 6's split and sample size,
notebook 1's fallback), kdutils.runtime (dataset_facts) and kdutils.presets (the named datasets' image sizes and
class counts).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kdutils.data import dataset_key

# What the named datasets hold, known without loading them: image size and (train, test) split sizes.
IMAGE_SIZES = {"digits": 16, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64, "cifar10-subset": 32}
TRAIN_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "tinyimagenet": (100_000, 10_000),
               "digits": (1_437, 360), "cifar10-subset": (10_000, 2_000)}

# Training images per class of the named datasets, for the validation-split checks (digits: the smallest class of
# its stratified 80% train split, 139 or 140 depending on the seed).
CLASS_TRAIN_COUNTS = {"cifar10": 5000, "cifar100": 500, "tinyimagenet": 500, "digits": 139, "cifar10-subset": 1000}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200, "digits": 10, "cifar10-subset": 10}


def parameters_source(path: str | Path) -> str | None:
    """The source of a notebook's first cell tagged `parameters` (the one papermill injects after), None without one.
    Read as plain JSON (the .ipynb format 4): importing nbformat would cost ~2 s before the first kernel starts."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = nb.get("cells", []) if nb.get("nbformat", 4) >= 4 else \
        [c for w in nb.get("worksheets", []) for c in w.get("cells", [])]       # format 3, as nbformat reads it
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return None
    source = cell.get("source", cell.get("input", ""))
    return "".join(source) if isinstance(source, list) else source


def has_parameters_cell(path: str | Path) -> bool:
    """Whether a notebook has a cell tagged `parameters` (papermill injects its settings right after it)."""
    return parameters_source(path) is not None


def dataset_facts(dataset: str) -> dict:
    """Split sizes, class count, image size and training images per class of a dataset name or .npz file, without
    a kernel: names from the tables above (nothing is downloaded), a file read and checked by kdutils.data's own
    .npz checks, so a missing, corrupt or malformed file is refused here. Messages quote `dataset` as given (a
    relative path is taken from the current directory, as absolute_paths does for the notebooks)."""
    import numpy as np
    from kdutils.data import validate_arrays
    from kdutils.datasets import DATASETS, read_npz
    text = str(dataset)
    key, path = dataset_key(text), Path(text).expanduser()
    if text.lower().endswith(".npz") or (key not in DATASETS and path.is_file()):
        if not path.is_file():
            raise FileNotFoundError(f"dataset {text!r}: no such file ({os.path.abspath(path)}: a relative path starts "
                                    f"at the current directory {os.getcwd()}). Check the path, or use a dataset name: "
                                    f"{', '.join(DATASETS)}.")
        try:
            arrays = validate_arrays(read_npz(path), source=text)
        except (OSError, ValueError) as err:
            raise ValueError(f"dataset {text!r}: {err}") from None
        counts = np.bincount(arrays["y_train"], minlength=len(arrays["classes"])).tolist()
        return {"given": text, "name": path.stem, "num_train": len(arrays["y_train"]),
                "num_test": len(arrays["y_test"]), "num_classes": len(arrays["classes"]),
                "image_size": int(arrays["x_train"].shape[1]), "class_counts": counts}
    if key in DATASETS:
        return {"given": text, "name": key, "num_train": TRAIN_SIZES[key][0], "num_test": TRAIN_SIZES[key][1],
                "num_classes": NUM_CLASSES[key], "image_size": IMAGE_SIZES[key],
                "class_counts": [CLASS_TRAIN_COUNTS[key]] * NUM_CLASSES[key]}
    if "/" in text or os.sep in text or path.suffix:
        raise FileNotFoundError(f"dataset {text!r}: no such file ({os.path.abspath(path)}: a relative path starts at "
                                f"the current directory {os.getcwd()}). Check the path (an .npz with x_train, "
                                f"y_train, x_test, y_test), or use a dataset name: {', '.join(DATASETS)}.")
    raise ValueError(f"dataset {text!r} is neither a dataset name ({', '.join(DATASETS)}; case, '-' and '_' do not "
                     f"matter) nor an existing file; check the spelling, or pass the path of an .npz file.")


def check_models(config: dict, facts: dict) -> None:
    """Refuse a teacher or student that cannot take the dataset's images (a ViT needs 32 or 64 px, VGG at least
    32): both are built on the meta device, which allocates nothing."""
    from kdutils.models import build_model
    size = facts["image_size"]
    for role in ("teacher", "student"):
        try:
            with torch.device("meta"):
                build_model(config[role], max(2, facts["num_classes"]), image_size=size)
        except ValueError as err:
            raise ValueError(f"the {role} {config[role]} (pair {config['pair']}) cannot take the {size}x{size} images "
                             f"of dataset {facts['given']!r}: {err}. Choose another pair (-p pair NAME, see "
                             f"--list-presets) or a dataset whose images it takes.") from None


def check_kq_samples(config: dict, facts: dict) -> None:
    """Refuse a kq_samples that leaves KQ's statistics fewer than 2 images per class (notebooks 2, 3 and 6)."""
    n, classes = config["kq_samples"], facts["num_classes"]
    if n // classes < 2:
        raise ValueError(f"kq_samples={n} leaves {n // classes} image(s) per class for the {classes} classes of "
                         f"dataset {facts['given']!r}; KQ's statistics need at least 2 per class: pass -p kq_samples "
                         f"{2 * classes} or more.")


def check_validation_split(config: dict, facts: dict, *, notebook6: bool) -> None:
    """Refuse a validation split the notebooks would refuse late: every class must hold out at least 1 image (2 when
    notebook 6 runs: its KQ statistics on the validation images need pairs within a class) and keep 2 for training.
    With val_fraction 0 only notebook 6 splits, 10% of the training images (series_data)."""
    fraction = config["val_fraction"] or (0.1 if notebook6 else 0.0)
    if not fraction:
        return
    need = 2 if notebook6 else 1
    counts = [min(c, config["per_class"]) if config["per_class"] else c for c in facts["class_counts"]]

    def fits(n: int, f: float) -> bool:
        held = int(round(f * n))               # as kdutils.data.split_validation rounds
        return held >= need and n - held >= 2

    bad = [c for c in counts if not fits(c, fraction)]
    if not bad:
        return
    c = min(bad)
    held = int(round(fraction * c))
    why = ("notebook 6 needs at least 2 validation images per class (its KQ statistics on them use pairs within a "
           "class)" if notebook6 else "every class needs at least 1 validation image") + " and 2 training images"
    fixes = []
    if 0 < config["val_fraction"] or not notebook6:
        fractions = [f / 100 for f in range(5, 100, 5) if all(fits(n, f / 100) for n in counts)]
        fixes += [f"-p val_fraction {fractions[0]:g}"] if fractions else []
    n_needed = next(n for n in range(1, 10**6) if fits(n, fraction))
    if n_needed <= min(facts["class_counts"]):
        fixes.insert(0, f"-p per_class {n_needed} or more")
    of = f"per_class {config['per_class']}" if config["per_class"] and config["per_class"] <= c else "the dataset's"
    raise ValueError(f"the validation split does not fit: {fraction:g} of {c} training images per class ({of}) "
                     f"holds out {held} and keeps {c - held}, but {why}. "
                     + (f"Pass {' or '.join(fixes)}." if fixes else "Use a dataset with more images per class."))


def pretrained_fallback(config: dict, run_dir: str | Path) -> str | None:
    """Why notebook 1 will train the teacher from scratch although `pretrained` asks for ImageNet weights (they
    cannot be loaded, e.g. offline), or None: not asked, loadable (they are in the torch hub cache afterwards), or
    notebook 1 already finished in run_dir (its teacher_metrics.json records what it used)."""
    if not config["pretrained"] or (Path(run_dir) / "teacher_metrics.json").is_file():
        return None
    from kdutils import models
    try:
        models.download_weights(models._WEIGHTS[config["teacher"]])
    except RuntimeError as err:
        return str(err)
    return None
