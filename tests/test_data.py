"""Tests for kdutils.data and kdutils.datasets: loaders (digits, .npz, a miniature Tiny ImageNet tree), error
messages, batches."""
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kdutils.data import Dataset, batches, load_dataset, normalize, random_crop_flip
from kdutils.datasets import TINY_CACHE, TINY_DIR


# ---------------------------------------------------------------------------------------------------------------
# helpers

def direct_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean / population std of uint8 NCHW images in [0, 1], the obvious float64 way."""
    v = x.double().div(255).transpose(0, 1).reshape(x.shape[1], -1)
    return v.mean(1).numpy(), v.std(1, unbiased=False).numpy()


def write_npz(path: Path, drop: tuple[str, ...] = (), **override) -> Path:
    """A small valid .npz dataset (4 classes, 8x8 RGB), with keys dropped or replaced."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), "y_train": np.arange(20) % 4,
              "x_test": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), "y_test": np.arange(8) % 4,
              "classes": np.array(["a", "b", "c", "d"])}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})
    return path


SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-subset.npz"


@pytest.fixture(scope="module")
def shared() -> Dataset:
    """The shared CIFAR-10 subset, loaded once for the module (skipped when absent)."""
    if not SHARED_NPZ.exists():
        pytest.skip(f"{SHARED_NPZ} not found")
    return load_dataset(SHARED_NPZ)


# ---------------------------------------------------------------------------------------------------------------
# digits

def test_digits_shapes_split_and_stats():
    d = load_dataset("digits")
    assert d.name == "digits"
    assert d.x_train.shape == (1437, 3, 16, 16) and d.x_test.shape == (360, 3, 16, 16)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64 and d.y_test.dtype == torch.int64
    assert d.classes == tuple(str(i) for i in range(10)) and d.num_classes == 10
    assert d.image_size == 16 and d.num_train == 1437
    # grey replicated to RGB, full 0..255 range (16 -> 255)
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 1]) and torch.equal(d.x_train[:, 0], d.x_train[:, 2])
    assert int(d.x_train.min()) == 0 and int(d.x_train.max()) == 255
    # stratified: every class's test share is 20% up to rounding
    full = np.bincount(load_digits().target)
    test = torch.bincount(d.y_test, minlength=10).numpy()
    assert np.all(np.abs(test - 0.2 * full) <= 1)
    assert np.array_equal(test + torch.bincount(d.y_train, minlength=10).numpy(), full)
    mean, std = direct_stats(d.x_train)
    assert np.allclose(d.mean, mean, rtol=0, atol=1e-12) and np.allclose(d.std, std, rtol=0, atol=1e-12)
    assert all(isinstance(v, float) for v in (*d.mean, *d.std))
    assert "digits" in repr(d) and "1437" in repr(d) and len(repr(d)) < 300


def test_digits_follow_sklearn_split_and_bilinear_upsampling():
    d = load_dataset("digits", seed=7)
    raw = load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(raw.target)), test_size=0.2, stratify=raw.target,
                                           random_state=7)
    assert torch.equal(d.y_train, torch.from_numpy(raw.target[idx_train]))
    assert torch.equal(d.y_test, torch.from_numpy(raw.target[idx_test]))
    img = torch.from_numpy(raw.images[idx_test]).float()[:, None] * 255 / 16
    up = torch.nn.functional.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)
    assert (d.x_test[:, 0].float() - up[:, 0]).abs().max() <= 0.5 + 1e-4  # rounded bilinear upsampling
    assert int(d.x_test[:, :, 0, 0].max()) == 0  # the blank 8x8 corner stays black


def test_digits_seeded_split():
    a, b, c = load_dataset("DIGITS", seed=1), load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    assert a.mean != c.mean


def test_per_class_subsets():
    d = load_dataset("digits", per_class=7, seed=3)
    assert d.num_train == 70 and torch.equal(torch.bincount(d.y_train), torch.full((10,), 7))
    assert torch.equal(load_dataset("digits", per_class=7, seed=3).x_train, d.x_train)
    assert not torch.equal(load_dataset("digits", per_class=7, seed=4).x_train, d.x_train)
    mean, _ = direct_stats(d.x_train)
    assert np.allclose(d.mean, mean, atol=1e-12)  # stats are computed on the subset
    assert load_dataset("digits", per_class=10_000).num_train == 1437  # classes with fewer keep everything
    for bad in (0, -3):
        with pytest.raises(ValueError, match="per_class must be a positive int"):
            load_dataset("digits", per_class=bad)


def test_dataset_to_device_and_record():
    d = load_dataset("digits", per_class=2)
    e = d.to("cpu")
    assert isinstance(e, Dataset) and e.x_train.device.type == "cpu" and torch.equal(e.x_train, d.x_train)
    assert e.classes == d.classes and e.mean == d.mean
    with pytest.raises(AttributeError):
        d.name = "other"  # frozen record


# ---------------------------------------------------------------------------------------------------------------
# the shared CIFAR-10 subset

def test_shared_npz(shared):
    d = shared
    assert d.name == "cifar10-subset"
    assert d.x_train.shape == (10000, 3, 32, 32) and d.x_test.shape == (2000, 3, 32, 32)
    assert d.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert torch.equal(torch.bincount(d.y_train), torch.full((10,), 1000))
    assert np.allclose(d.mean, (0.4913, 0.4821, 0.4465), atol=1e-3)
    mean, std = direct_stats(d.x_train)
    assert np.allclose(d.mean, mean, atol=1e-12) and np.allclose(d.std, std, atol=1e-12)
    raw = np.load(SHARED_NPZ)  # NHWC -> NCHW keeps pixels and channels in place
    assert torch.equal(d.x_train[5], torch.from_numpy(raw["x_train"][5]).permute(2, 0, 1))
    assert torch.equal(d.y_test, torch.from_numpy(raw["y_test"]))


def test_shared_npz_per_class(shared):
    s = load_dataset(SHARED_NPZ, per_class=50, seed=0)
    assert s.num_train == 500 and torch.equal(torch.bincount(s.y_train), torch.full((10,), 50))
    assert s.x_test.shape[0] == 2000  # only the train split is subset
    assert torch.equal(load_dataset(SHARED_NPZ, per_class=50, seed=0).x_train, s.x_train)
    other = load_dataset(str(SHARED_NPZ), per_class=50, seed=1)
    assert not torch.equal(other.x_train, s.x_train)
    # every kept image is a row of the full train split, with its label
    full = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(shared.x_train, shared.y_train)}
    assert all(full[bytes(x.numpy().tobytes())] == int(y) for x, y in zip(s.x_train, s.y_train))


# ---------------------------------------------------------------------------------------------------------------
# Tiny ImageNet (a generated miniature of the official layout)

COLOURS = {"n01": (255, 0, 0), "n02": (0, 255, 0), "n03": (0, 0, 255)}


def make_tiny_tree(root: Path) -> list[str]:
    """Write wnids/words/train/val like the official zip; returns the val wnids in annotation order."""
    tree = root / TINY_DIR
    tree.mkdir(parents=True)
    (tree / "wnids.txt").write_text("n02\nn01\nn03\n")  # deliberately unsorted
    (tree / "words.txt").write_text("n00\tentity\nn01\tgoldfish, Carassius auratus\n"
                                    "n02\tEuropean fire salamander, Salamandra salamandra\nn03\tbullfrog\n")
    for w, colour in COLOURS.items():
        (tree / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(tree / "train" / w / "images" / f"{w}_{i}.JPEG")
    val_wnids = ["n03", "n01", "n03", "n02", "n01"]
    (tree / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(val_wnids):
        Image.new("RGB", (64, 64), COLOURS[w]).save(tree / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (tree / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return val_wnids


def test_tinyimagenet_tree_and_cache(tmp_path):
    val_wnids = make_tiny_tree(tmp_path)
    d = load_dataset("tiny-imagenet", root=tmp_path, download=False, progress=False)
    assert d.name == "tinyimagenet"
    assert d.classes == ("goldfish", "European fire salamander", "bullfrog")  # sorted wnids n01, n02, n03
    assert d.x_train.shape == (6, 3, 64, 64) and d.x_test.shape == (5, 3, 64, 64) and d.image_size == 64
    expected = torch.tensor([int(w[-1]) - 1 for w in val_wnids])
    assert torch.equal(d.y_test, expected)
    assert torch.equal(torch.bincount(d.y_train), torch.tensor([2, 2, 2]))
    # each image's dominant colour is its class's colour (red n01, green n02, blue n03)
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert torch.equal(x.float().mean((2, 3)).argmax(1), y)
    assert (tmp_path / TINY_CACHE).is_file() and not list(tmp_path.glob("*.tmp"))
    shutil.rmtree(tmp_path / TINY_DIR)  # the second load can only come from the cache
    again = load_dataset("tinyimagenet", root=tmp_path, download=False)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, k), getattr(d, k))
    assert again.classes == d.classes and again.mean == d.mean


def test_tinyimagenet_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip") as e:
        load_dataset("tinyimagenet", root=tmp_path, download=False)
    assert "digits" in str(e.value) and "download=True" in str(e.value)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    with pytest.raises(RuntimeError, match="Could not download Tiny ImageNet") as e:
        load_dataset("tinyimagenet", root=tmp_path)
    assert "tiny-imagenet-200.zip" in str(e.value) and "digits" in str(e.value)
    assert "URLError" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR errors (no network used)

@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("CIFAR-100", "cifar-100-python")])
def test_cifar_missing_offline(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError, match=folder) as e:
        load_dataset(name, root=tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "digits" in msg and ".npz" in msg and ".tar.gz" in msg


@pytest.mark.parametrize("error", [urllib.error.URLError("no route to host"), OSError(101, "Network is unreachable")])
def test_cifar_download_failure(tmp_path, monkeypatch, error):
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise error

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    with pytest.raises(RuntimeError, match="Could not download CIFAR-10") as e:
        load_dataset("cifar10", root=tmp_path, download=True)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg and "digits" in msg
    assert isinstance(e.value.__cause__, OSError)


# ---------------------------------------------------------------------------------------------------------------
# bad input

def test_unknown_name():
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'") as e:
        load_dataset("imagenet")
    for word in ("cifar10", "cifar100", "tinyimagenet", "digits", ".npz"):
        assert word in str(e.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No .npz file at") as e:
        load_dataset(tmp_path / "nope.npz")
    assert "nope.npz" in str(e.value) and "digits" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "nope.npz"))


def test_npz_valid_without_classes_and_grayscale(tmp_path):
    d = load_dataset(write_npz(tmp_path / "ok.npz", drop=("classes",)))
    assert d.name == "ok" and d.classes == ("0", "1", "2", "3") and d.x_train.shape == (20, 3, 8, 8)
    raw = np.load(tmp_path / "ok.npz")
    assert torch.equal(d.x_test, torch.from_numpy(raw["x_test"]).permute(0, 3, 1, 2))
    grey = np.arange(20 * 64, dtype=np.uint8).reshape(20, 8, 8)
    g = load_dataset(write_npz(tmp_path / "g.npz", x_train=grey, x_test=grey[:8, :, :, None]))
    assert g.x_train.shape == (20, 3, 8, 8) and g.x_test.shape == (8, 3, 8, 8)
    assert torch.equal(g.x_train[:, 2], torch.from_numpy(grey)) and torch.equal(g.x_test[:, 0], g.x_test[:, 1])


@pytest.mark.parametrize("kwargs,match,fix", [
    ({"drop": ("y_test", "x_test")}, "lacks the key\\(s\\) x_test, y_test", "savez_compressed"),
    ({"x_train": np.zeros((20, 8, 8, 3), np.float32)}, "x_train has dtype float32", "astype(np.uint8)"),
    ({"x_test": np.zeros((8, 3, 8, 8), np.uint8)}, "x_test has shape \\(8, 3, 8, 8\\)", "transpose(0, 2, 3, 1)"),
    ({"x_train": np.zeros((20, 8, 8, 4), np.uint8)}, "expected channels-last \\(N, H, W, 3\\)", "(N, H, W, 3)"),
    ({"y_train": np.arange(20) - 1}, "y_train has negative labels", "0..C-1"),
    ({"y_test": np.arange(8)}, "labels go up to 7 but only 4 class names", "list every class"),
    ({"y_train": np.arange(19) % 4}, "x_train has 20 images but y_train has 19 labels", "one label per image"),
    ({"y_train": (np.arange(20) % 4).astype(float)}, "y_train must hold integer class indices", "astype(np.int64)"),
    ({"x_test": np.zeros((8, 16, 16, 3), np.uint8)}, "train images are \\(8, 8, 3\\) but test images are",
     "resize one split"),
    ({"classes": np.array([["a", "b"], ["c", "d"]])}, "classes must be a non-empty 1-D array", "dtype=str"),
    ({"classes": np.array(["a", 1], dtype=object)}, "'classes' is an object array", "str array"),
    ({"x_test": np.zeros((0, 8, 8, 3), np.uint8), "y_test": np.zeros(0, np.int64)}, "x_test is empty",
     "at least one image"),
])
def test_npz_bad_content(tmp_path, kwargs, match, fix):
    path = write_npz(tmp_path / "bad.npz", **kwargs)
    with pytest.raises(ValueError, match=match) as e:
        load_dataset(path)
    assert fix in str(e.value)


def test_npz_corrupt(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(ValueError, match="is not a readable .npz archive") as e:
        load_dataset(junk)
    assert "Re-create or re-download" in str(e.value)
    good = write_npz(tmp_path / "good.npz").read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        load_dataset(cut)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_dataset(npy)


# ---------------------------------------------------------------------------------------------------------------
# batches, normalize, augmentation

def small_xy(n: int = 50, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images and labels 100..100+n (so labels identify rows)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) + 100


def test_batches_cover_epoch_and_drop_last():
    x, y = small_xy()
    out = list(batches(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert [len(b[1]) for b in out] == [16, 16, 16, 2]
    seen = torch.cat([b[1] for b in out])
    assert torch.equal(seen.sort().values, y) and not torch.equal(seen, y)  # each once, shuffled
    dropped = list(batches(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(1), drop_last=True))
    assert [len(b[1]) for b in dropped] == [16, 16, 16] and len(torch.cat([b[1] for b in dropped]).unique()) == 48
    plain = list(batches(x, y, 20))
    assert torch.equal(torch.cat([b[1] for b in plain]), y)
    assert torch.equal(torch.cat([b[0] for b in plain]), x.float() / 255)  # no mean/std: scaled to [0, 1]


def test_batches_normalise_and_index():
    x, y = small_xy()
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    for xb, yb, idx in batches(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(2), mean=mean,
                               std=std, with_index=True):
        assert xb.dtype == torch.float32 and idx.dtype == torch.int64
        assert torch.equal(yb, y[idx])
        ref = (x[idx].double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
            / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        assert torch.allclose(xb.double(), ref, atol=1e-5, rtol=0)
    assert torch.allclose(normalize(x[0], mean, std)[2], (x[0, 2].double() / 255 - 0.3).float() / 0.1, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float(), mean, std)
    with pytest.raises(ValueError, match="both mean and std"):
        next(batches(x, y, 4, mean=mean))


def test_batches_deterministic_augmentation():
    x, y = small_xy(n=32, size=32)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([b[0] for b in batches(x, y, 10, shuffle=True, generator=g, augment=True)])

    a, b, c = run(5), run(5), run(6)
    assert a.shape == (32, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_augmentation_is_crop_plus_flip():
    x, y = small_xy(n=64, size=12)
    g = torch.Generator().manual_seed(0)
    (xb, _, idx), = list(batches(x, y, 64, shuffle=True, generator=g, augment=True, with_index=True))
    out = (xb * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = []
    for o, i in zip(out, idx):  # each output is exactly one crop (flipped or not) of the zero-padded source
        crops = {(dy, dx): padded[i, :, dy:dy + 12, dx:dx + 12] for dy in range(9) for dx in range(9)}
        matches = [(dy, dx, f) for (dy, dx), p in crops.items() for f in (False, True)
                   if torch.equal(o, p.flip(-1) if f else p)]
        assert len(matches) == 1
        found.append(matches[0])
    assert {f for _, _, f in found} == {False, True}
    assert len({dy for dy, _, _ in found}) > 3 and len({dx for _, dx, _ in found}) > 3


def test_flip_and_bright_pixel_shift():
    x, _ = small_xy(n=200, size=8)
    flipped = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 60 < int(mirrored.sum()) < 140

    img = torch.zeros(128, 3, 32, 32, dtype=torch.uint8)
    img[:, :, 10, 6] = 255  # one bright pixel, left of centre so a flip is visible
    out = torch.cat([b[0] for b in batches(img, torch.zeros(128, dtype=torch.int64), 32, augment=True,
                                             generator=torch.Generator().manual_seed(3))])
    pos = (out[:, 0] > 0.5).nonzero()
    assert pos.shape == (128, 3) and torch.equal(pos[:, 0], torch.arange(128))  # exactly one bright pixel each
    r, c = pos[:, 1], pos[:, 2]
    assert bool(((r - 10).abs() <= 4).all())
    plain, flip = (c - 6).abs() <= 4, (c - 25).abs() <= 4
    assert bool((plain | flip).all()) and bool(plain.any()) and bool(flip.any())
    assert int((r - 10).min()) < 0 < int((r - 10).max())


# ---------------------------------------------------------------------------------------------------------------
# the named dataset cifar10-subset: the shared file, or the same draw from the download

def test_subset_draw_follows_the_shared_files_recipe(shared_npz):
    """The draw of data/README.md, replayed on synthetic official label orders: the random stream depends only on
    the class sizes, so the drawn test images' within-class ranks and both splits' row orders (labels) must be the
    shared file's exactly."""
    from kdutils.datasets import subset_indices
    raw = np.load(shared_npz)
    rng = np.random.default_rng(7)
    y_train_full, y_test_full = rng.permutation(np.repeat(np.arange(10), 5000)), rng.permutation(np.repeat(np.arange(10), 1000))
    train, test = subset_indices(y_train_full, y_test_full)
    assert len(set(train)) == 10_000 and len(set(test)) == 2_000
    assert np.array_equal(y_train_full[train], raw["y_train"]) and np.array_equal(y_test_full[test], raw["y_test"])
    rank = np.empty(10_000, dtype=int)
    for c in range(10):
        rank[np.flatnonzero(y_test_full == c)] = np.arange(1000)
    assert np.array_equal(rank[test], raw["test_class_index"])


def test_named_subset_reads_the_file_or_draws_from_the_download(shared_npz, tmp_path, monkeypatch, capsys):
    from kdutils import datasets
    named = load_dataset("cifar10-subset", root=tmp_path)               # found in ../shared/data/
    from_file = load_dataset(shared_npz)
    assert named.name == "cifar10-subset" and torch.equal(named.x_train, from_file.x_train)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(datasets, "SHARED_DATA", tmp_path / "nowhere")
    raw = np.load(shared_npz)
    full = {"x_train": np.zeros((50_000, 32, 32, 3), np.uint8), "y_train": np.repeat(np.arange(10), 5000),
            "x_test": np.zeros((10_000, 32, 32, 3), np.uint8), "y_test": np.repeat(np.arange(10), 1000),
            "classes": [str(c) for c in raw["classes"]]}
    full["x_train"][:, 0, 0, 0] = np.arange(50_000) % 251                 # a pixel that says which image it is
    monkeypatch.setattr(datasets, "_load_cifar", lambda root, download, hundred: full)
    drawn = load_dataset("cifar10-subset", root=tmp_path)
    assert "drawing the same 10,000 + 2,000 images from the CIFAR-10 download" in capsys.readouterr().out
    train, _ = datasets.subset_indices(full["y_train"], full["y_test"])
    assert torch.equal(drawn.y_train, torch.from_numpy(raw["y_train"]))
    assert torch.equal(drawn.x_train[:, 0, 0, 0], torch.from_numpy((train % 251).astype(np.uint8)))
