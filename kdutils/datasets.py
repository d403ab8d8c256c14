"""Getting each named dataset's arrays: the DATASETS table, the CIFAR-10/100 (torchvision), Tiny ImageNet (official
zip, decoded once into an .npz cache) and scikit-learn digits loaders, and reading a dataset .npz file.

Every loader returns a dict of NumPy arrays: x_train, y_train, x_test, y_test (NHWC uint8 images, integer labels)
and classes, which kdutils.data.load_dataset checks (validate_arrays) and turns into a Dataset. Called by
kdutils.data (load_dataset, peek_npz) and kdutils.checks (the runner's up-front dataset check); notebooks reach it
through kdutils.data.load_dataset.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import utils as tv_utils
from tqdm.auto import tqdm

DATASETS: dict[str, str] = {
    "cifar10": "CIFAR-10, 50k/10k 32x32 RGB, 10 classes (torchvision download into root)",
    "cifar100": "CIFAR-100, 50k/10k 32x32 RGB, 100 fine classes (torchvision download into root)",
    "tinyimagenet": "Tiny ImageNet, 100k/10k 64x64 RGB, 200 classes (official zip; val split used as test)",
    "digits": "scikit-learn 8x8 digits upsampled to 16x16 RGB, 1437/360 stratified split (offline)",
    "cifar10-subset": "the course's CIFAR-10 subset, 10k/2k 32x32 RGB, 1,000/200 per class (data/README.md): "
                      "cifar10-subset.npz from root or ../shared/data/, else the same draw from the CIFAR-10 download",
}
SUBSET_FILE = "cifar10-subset.npz"
# Where the course's shared files live beside a source checkout (../shared/data/ next to the repository).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_DIR = "tiny-imagenet-200"
TINY_CACHE = "tiny-imagenet-200-cache.npz"
_REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
_OFFLINE_HINT = ("Offline alternatives: load_dataset('digits') (bundled with scikit-learn) or load_dataset(<path to an "
                 ".npz with x_train, y_train, x_test, y_test>), e.g. the shared cifar10-subset.npz.")
NPZ_FORMAT = ("Expected format: np.savez_compressed(path, x_train=<uint8 (N,H,W,3)>, y_train=<int (N,)>, "
              "x_test=<uint8 (M,H,W,3)>, y_test=<int (M,)>[, classes=np.array(names, dtype=str)]).")


def dataset_arrays(key: str, root: Path, *, download: bool, seed: int, progress: bool) -> dict:
    """The arrays of the named dataset `key` (a DATASETS key), from `root` (downloaded there if `download`); `seed`
    drives the digits train/test split, `progress` shows Tiny ImageNet's decoding bar."""
    if key == "cifar10":
        return _load_cifar(root, download, hundred=False)
    if key == "cifar100":
        return _load_cifar(root, download, hundred=True)
    if key == "tinyimagenet":
        return _load_tinyimagenet(root, download, progress)
    if key == "digits":
        return _load_digits(seed)
    if key == "cifar10-subset":
        return _load_cifar10_subset(root, download)
    raise ValueError(f"Unknown dataset {key!r}. Valid names: {', '.join(DATASETS)}.")


# ----------------------------------------------------------------------------------------------------------------
# loaders: each returns a dict with x_train, y_train, x_test, y_test (numpy, NHWC uint8 / int labels), classes

def _load_digits(seed: int) -> dict:
    """scikit-learn digits upsampled bilinearly to 16x16 (cheap on CPU), grey as RGB, stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    img = torch.from_numpy(d.images).float()[:, None] * (255.0 / 16.0)
    img = F.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)
    img = img.round().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target,
                                           random_state=seed)
    return {"x_train": img[idx_train], "y_train": d.target[idx_train], "x_test": img[idx_test],
            "y_test": d.target[idx_test], "classes": [str(c) for c in d.target_names]}


def _load_cifar(root: Path, download: bool, hundred: bool) -> dict:
    """CIFAR-10/100 through torchvision (fine labels for CIFAR-100); friendly errors when files are missing."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if hundred else CIFAR10
    folder = root / cls.base_folder

    def complete() -> bool:
        return all(tv_utils.check_integrity(str(folder / f), md5) for f, md5 in cls.train_list + cls.test_list)

    fix = (f"Fix: on a machine with internet download {cls.url} (md5 {cls.tgz_md5}) and either extract it so that "
           f"{folder.resolve()}/ exists, or put the archive at {(root / cls.filename).resolve()} and call again with "
           f"download=True (it is then verified and extracted without network). {_OFFLINE_HINT}")
    what = "CIFAR-100" if hundred else "CIFAR-10"
    if not complete():
        if not download:
            raise FileNotFoundError(f"{what} not found (or a file fails its checksum) in {folder.resolve()} and "
                                    f"download=False. {fix}")
        try:
            tv_utils.download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        except Exception as e:  # network down, checksum mismatch, truncated archive ...
            raise RuntimeError(f"Could not download {what} ({type(e).__name__}: {e}). {fix}") from e
        if not complete():
            raise RuntimeError(f"{what} was downloaded but {folder.resolve()} is still incomplete. Delete it and "
                               f"{(root / cls.filename).resolve()}, then retry. {fix}")
    train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    return {"x_train": train.data, "y_train": np.asarray(train.targets), "x_test": test.data,
            "y_test": np.asarray(test.targets), "classes": list(train.classes)}


def subset_indices(y_train: np.ndarray, y_test: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The draw of the course's CIFAR-10 subset (data/README.md) from the official label order: per class 1,000 of
    its training images and 200 of its test images (numpy default_rng(seed), without replacement, sorted), then one
    permutation of the training rows and one of the test rows. Returns (train rows, test rows) of the full splits."""
    rng = np.random.default_rng(seed)
    train = np.concatenate([np.sort(rng.choice(np.flatnonzero(y_train == c), 1000, replace=False)) for c in range(10)])
    test = np.concatenate([np.flatnonzero(y_test == c)[np.sort(rng.choice(1000, 200, replace=False))]
                           for c in range(10)])
    return train[rng.permutation(len(train))], test[rng.permutation(len(test))]


def _load_cifar10_subset(root: Path, download: bool) -> dict:
    """cifar10-subset.npz from root or SHARED_DATA; without it, the same draw (subset_indices) from the CIFAR-10
    download: the same images in their original pixels (the file holds JPEG q75 decodes), so numbers differ a
    little. Says which one it uses."""
    for folder in (root, SHARED_DATA):
        if (folder / SUBSET_FILE).is_file():
            return read_npz(folder / SUBSET_FILE)
    print(f"{SUBSET_FILE} is not in {root} or {SHARED_DATA}: drawing the same 10,000 + 2,000 images from the CIFAR-10 "
          f"download instead (their original pixels, not the file's JPEG-decoded ones, so the numbers will differ a "
          f"little from the committed outputs).", flush=True)
    full = _load_cifar(root, download, hundred=False)
    train, test = subset_indices(full["y_train"], full["y_test"])
    return {"x_train": full["x_train"][train], "y_train": full["y_train"][train], "x_test": full["x_test"][test],
            "y_test": full["y_test"][test], "classes": full["classes"]}


def _load_tinyimagenet(root: Path, download: bool, progress: bool) -> dict:
    """Tiny ImageNet (val split as test): from the decoded .npz cache, the extracted tree, or the official zip."""
    cache, tree = root / TINY_CACHE, root / TINY_DIR
    if cache.is_file():
        return read_npz(cache, hint=f"Delete {cache.resolve()} to rebuild it from {tree.resolve()}/.")
    fix = (f"Fix: on a machine with internet download {TINY_URL} (md5 {TINY_MD5}) and either extract it so that "
           f"{(tree / 'wnids.txt').resolve()} exists, or put the zip at {(root / (TINY_DIR + '.zip')).resolve()} and "
           f"call again with download=True (it is then verified and extracted without network). {_OFFLINE_HINT}")
    if not (tree / "wnids.txt").is_file():
        if not download:
            raise FileNotFoundError(f"Tiny ImageNet not found: {(tree / 'wnids.txt').resolve()} is missing and "
                                    f"download=False. {fix}")
        try:
            tv_utils.download_and_extract_archive(TINY_URL, str(root), filename=TINY_DIR + ".zip", md5=TINY_MD5)
        except Exception as e:  # network down, checksum mismatch, truncated archive ...
            raise RuntimeError(f"Could not download Tiny ImageNet ({type(e).__name__}: {e}). {fix}") from e
    arrays = _parse_tinyimagenet(tree, progress)
    _save_npz_atomic(cache, arrays)
    return arrays


def _parse_tinyimagenet(tree: Path, progress: bool) -> dict:
    """Decode the extracted Tiny ImageNet tree; labels index sorted(wnids), names are words.txt's first synonym."""
    from PIL import Image

    wnids = sorted({line.strip() for line in (tree / "wnids.txt").read_text().splitlines() if line.strip()})
    label = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (tree / "words.txt").is_file():
        for line in (tree / "words.txt").read_text(encoding="utf-8").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in label:
                words[wnid] = text.split(",")[0].strip() or wnid
    classes = [words.get(w, w) for w in wnids]

    train_files, train_labels = [], []
    for w in wnids:
        files = sorted((tree / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise FileNotFoundError(f"No training images in {(tree / 'train' / w / 'images').resolve()}; the "
                                    f"Tiny ImageNet tree is incomplete. Re-extract {TINY_DIR}.zip into "
                                    f"{tree.parent.resolve()}.")
        train_files += files
        train_labels += [label[w]] * len(files)
    ann = tree / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"{ann.resolve()} is missing; re-extract {TINY_DIR}.zip into {tree.parent.resolve()}.")
    test_files, test_labels = [], []
    for line in ann.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or parts[1] not in label:
            raise ValueError(f"{ann.resolve()}: line {line!r} does not name a wnid from wnids.txt; re-extract "
                             f"{TINY_DIR}.zip.")
        test_files.append(tree / "val" / "images" / parts[0])
        test_labels.append(label[parts[1]])

    def decode(files: list[Path], desc: str) -> np.ndarray:
        out = None
        for i, f in enumerate(tqdm(files, desc=desc, disable=not progress)):
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise RuntimeError(f"Cannot decode {f} ({e}); re-extract {TINY_DIR}.zip.") from e
            if out is None:
                out = np.empty((len(files), *a.shape), dtype=np.uint8)
            if a.shape != out.shape[1:]:
                raise ValueError(f"{f} is {a.shape[1]}x{a.shape[0]}, expected {out.shape[2]}x{out.shape[1]} like the "
                                 f"other images; re-extract {TINY_DIR}.zip.")
            out[i] = a
        return out

    return {"x_train": decode(train_files, "tinyimagenet train"), "y_train": np.asarray(train_labels, np.int64),
            "x_test": decode(test_files, "tinyimagenet val"), "y_test": np.asarray(test_labels, np.int64),
            "classes": classes}


# ----------------------------------------------------------------------------------------------------------------
# .npz files: a dataset given as a file, and the Tiny ImageNet cache

def read_npz(path: Path, hint: str = "") -> dict:
    """Read the arrays of an .npz (never unpickling); missing file, corrupt archive or missing keys raise clearly."""
    if not path.is_file():
        raise FileNotFoundError(f"No .npz file at {path.resolve()} (relative paths start at the current directory "
                                f"{Path.cwd()}). Check the path, or use a dataset name: {', '.join(DATASETS)}.")
    corrupt = f"{path.resolve()} is not a readable .npz archive"
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{corrupt} ({type(e).__name__}: {e}). Re-create or re-download it. {NPZ_FORMAT} {hint}")\
            from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path.resolve()} holds a single array (.npy format), not an .npz archive. {NPZ_FORMAT}")
    with f:
        missing = [k for k in _REQUIRED_KEYS if k not in f.files]
        if missing:
            raise ValueError(f"{path.resolve()} lacks the key(s) {', '.join(missing)} (it has: "
                             f"{', '.join(f.files) or 'nothing'}). {NPZ_FORMAT} {hint}")
        out = {}
        for k in (*_REQUIRED_KEYS, "classes"):
            if k not in f.files:
                continue
            try:
                out[k] = f[k]
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise ValueError(f"{path.resolve()}: '{k}' is an object array, which is not loaded (no pickle). "
                                     f"Save it as a plain numeric/str array. {NPZ_FORMAT} {hint}") from e
                raise ValueError(f"{corrupt}: '{k}' fails to load ({e}). {NPZ_FORMAT} {hint}") from e
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(f"{corrupt}: '{k}' fails to load ({type(e).__name__}: {e}). Re-create or "
                                 f"re-download it. {hint}") from e
    return out


def _save_npz_atomic(path: Path, arrays: dict) -> None:
    """Write arrays uncompressed (fast to reload) to a temp file beside `path`, then os.replace it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) if k != "classes" else np.array(v, dtype=str)
                            for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
