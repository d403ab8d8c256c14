"""Data integrity and KQ memory (issue 18, items 5, 8 and 13): a dataset whose content changed under the same name
is never paired with what was trained or cached on the old content; the data decides the image size and the KQ
class-sample rule; KQ and notebook 3's by-hand check stay in bounded memory at 64 px."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from kdutils import kq, presets, rundir
from kdutils.data import Dataset, fingerprint, load_dataset, peek_npz, split_validation
from kdutils.distill import distill_loss
from kdutils.models import build_model
from kdutils.checkpoints import load_checkpoint, save_checkpoint
from kdutils.train import fit, load_model, seed_everything

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


def write_npz(path: Path, n: int = 40, classes: int = 4, size: int = 8, shift: int = 0, seed: int = 0) -> Path:
    """A small random uint8 .npz dataset; `shift` relabels every image (y -> y + shift mod classes)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = (np.arange(n) + shift) % classes
    np.savez(path, x_train=x, y_train=y, x_test=x[:classes * 2], y_test=np.arange(classes * 2) % classes)
    return path


def generated(classes: int, per: int, size: int, seed: int = 0) -> Dataset:
    """Random images at `size` px, `per` per class, and a test split of 2 per class (made in the test)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes * per) % classes
    x = torch.randint(0, 256, (len(y), 3, size, size), dtype=torch.uint8, generator=g)
    return Dataset("gen", x, y, x[:2 * classes], y[:2 * classes], tuple(map(str, range(classes))), (0.5,) * 3,
                   (0.25,) * 3)


def train_one_epoch(data: Dataset, checkpoint: Path) -> list[dict]:
    """fit a fresh resnet10_narrow for one epoch with `checkpoint` (the notebook 1 call, shrunk)."""
    seed_everything(0)
    model = build_model("resnet10_narrow", data.num_classes, image_size=data.image_size)
    return fit(model, data, epochs=1, lr=0.01, batch_size=16, checkpoint=checkpoint, progress=False, desc="teacher",
               meta={"model": "resnet10_narrow", "image_size": data.image_size})


# ------------------------------------------------------------------------------------------------------------
# item 5: a content fingerprint with every checkpoint, cache and manifest

def test_fingerprint_is_the_content_of_both_splits(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    a, b = load_dataset(path), load_dataset(path)
    assert a is not b and fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 16
    assert a.source == str(path)
    assert fingerprint(a.to("cpu")) == fingerprint(a)                        # the device copy: same content
    relabelled = load_dataset(write_npz(tmp_path / "r.npz", shift=1))
    assert fingerprint(relabelled) != fingerprint(a)
    x_test = a.x_test.clone()
    x_test[3, 1, 2, 5] ^= 1                                                  # one bit of one test pixel
    assert fingerprint(dataclasses.replace(a, x_test=x_test)) != fingerprint(a)
    before = fingerprint(b)
    b.y_train[7] = (b.y_train[7] + 1) % 4                                    # in place: the memo must notice
    assert fingerprint(b) != before
    b.y_train[7] = (b.y_train[7] + 3) % 4                                    # and back
    assert fingerprint(b) == before
    train, val = split_validation(a, 0.25)
    assert len({fingerprint(a), fingerprint(train), fingerprint(val)}) == 3


def test_relabelled_npz_is_refused_by_fit_and_load_model(tmp_path):
    path, ck = write_npz(tmp_path / "d.npz"), tmp_path / "run" / "teacher.pt"
    original = load_dataset(path)
    train_one_epoch(original, ck)
    saved = load_checkpoint(ck)
    assert saved["config"]["data_fingerprint"] == saved["meta"]["data_fingerprint"] == fingerprint(original)
    assert saved["meta"]["data_source"] == str(path)
    write_npz(path, shift=1)                                       # relabelled in place, same name and size
    changed = load_dataset(path)
    assert (changed.name, changed.num_train, changed.num_classes) == (original.name, original.num_train,
                                                                        original.num_classes)
    with pytest.raises(ValueError) as err:                          # before the fix: "reusing finished checkpoint"
        train_one_epoch(changed, ck)
    message = str(err.value)
    assert f"{ck} was trained on data with fingerprint {fingerprint(original)} (recorded from {path})" in message
    assert f"{path} now has fingerprint {fingerprint(changed)}" in message and "--run-dir" in message
    with pytest.raises(ValueError, match=f"fingerprint {fingerprint(changed)}"):
        load_model(ck, data=changed, role="teacher")                # notebooks 2-5 load the teacher this way
    assert load_model(ck, data=original).kd_name == "resnet10_narrow"
    assert train_one_epoch(load_dataset(write_npz(path)), ck)[-1]["epoch"] == 1   # the old content: reused


def test_checkpoint_without_data_fingerprint_is_refused(tmp_path):
    data, ck = load_dataset(write_npz(tmp_path / "d.npz")), tmp_path / "teacher.pt"
    train_one_epoch(data, ck)
    state = load_checkpoint(ck)
    del state["config"]["data_fingerprint"], state["meta"]["data_fingerprint"]   # as an older kdutils wrote it
    save_checkpoint(ck, state)
    for attempt in (lambda: train_one_epoch(data, ck), lambda: load_model(ck, data=data)):
        with pytest.raises(ValueError, match="records no data fingerprint .*Delete the checkpoint or choose another"):
            attempt()
    assert load_model(ck).kd_name == "resnet10_narrow"             # without data: no claim, no check


def test_kq_cache_and_distill_teacher_cache_key_on_the_content(tmp_path):
    data = generated(classes=4, per=130, size=8)                   # 520 images: the old digest hashed every 2nd
    other_x = data.x_train.clone()
    other_x[1] = 255 - other_x[1]                                  # one image the old strided digest never read
    other = dataclasses.replace(data, x_train=other_x)
    seed_everything(0)
    teacher = build_model("resnet10_narrow", 4, image_size=8).eval().requires_grad_(False)
    cache: dict = {}
    for d in (data, other):
        student = build_model("resnet10_narrow", 4, image_size=8)
        with distill_loss(teacher, student, d, "hinton_kd", cache=cache, batch_size=64, progress=False):
            pass
    logits = [k for k in cache if isinstance(k, tuple) and k[-1] == "logits"]
    assert len(logits) == 2 and {k[2] for k in logits} == {fingerprint(data), fingerprint(other)}
    kq.layer_qualities(teacher, data, layers=[3], max_samples=40, per_class=10, probe=False, cache_dir=tmp_path,
                       progress=False)
    (cached,) = tmp_path.glob("kq-*.pt")
    assert torch.load(cached, weights_only=True)["key"]["data_fingerprint"] == fingerprint(data)


def test_manifest_records_the_data_it_ran_on(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    data, run_dir = load_dataset(path), tmp_path / "run"
    (run_dir / "teacher.pt").parent.mkdir(parents=True)
    (run_dir / "teacher.pt").write_bytes(b"w")
    config = presets.resolve_config("quick", dataset=str(path))
    manifest = json.loads(rundir.write_manifest(run_dir, "01_train_teacher", config,
                                                {"teacher": run_dir / "teacher.pt"}, data=data).read_text())
    assert manifest["data"] == {"name": "d", "source": rundir.shown_path(path), "fingerprint": fingerprint(data),
                                "num_train": 40, "num_test": 8, "num_classes": 4, "image_size": 8}
    assert "data" not in json.loads(rundir.write_manifest(run_dir, "x", config, {}).read_text())


# ------------------------------------------------------------------------------------------------------------
# item 8: the data decides the image size

def test_image_size_comes_from_the_data(tmp_path):
    small = write_npz(tmp_path / "s.npz", size=24)
    assert peek_npz(small) == {"image_size": 24, "num_classes": 4}
    assert presets.resolve_config("cifar10", dataset=str(small))["image_size"] == 24      # not the preset's 32
    assert presets.resolve_config("quick", dataset=str(small), image_size=24)["image_size"] == 24
    with pytest.raises(ValueError, match=r"image_size 48 does not match the data: digits has 16x16 images"):
        presets.resolve_config("quick", image_size=48)                                     # every model ran at 16
    with pytest.raises(ValueError, match=r"image_size 32 does not match the data: .*s\.npz has 24x24 images"):
        presets.resolve_config("cifar10", dataset=str(small), image_size=32)
    assert presets.resolve_config("cifar10", dataset="Tiny-ImageNet")["image_size"] == 64


# ------------------------------------------------------------------------------------------------------------
# item 13: the 50-per-class rule keys on what the data is; KQ memory at 64 px

def test_kq_per_class_keys_on_what_the_data_is(tmp_path):
    tiny_like = write_npz(tmp_path / "tiny.npz", n=400, classes=200, size=64)   # Tiny ImageNet's shape as a file
    config = presets.resolve_config("tinyimagenet", dataset=str(tiny_like))
    assert (config["kq_per_class"], config["image_size"]) == (50, 64)
    cifar_like = write_npz(tmp_path / "c.npz", n=40, classes=10, size=32)
    config = presets.resolve_config("tinyimagenet", dataset=str(cifar_like))
    assert (config["kq_per_class"], config["image_size"]) == (500, 32)
    assert presets.resolve_config("tinyimagenet", dataset=str(tiny_like), pair="vitb-vitet")["kq_per_class"] == 500
    assert kq.kq_per_class("x", "resnet34", num_classes=200, image_size=64) == 50      # distill's call
    assert kq.kq_per_class("x", "resnet34", num_classes=200, image_size=32) == 500


def test_kq_holds_at_most_one_layers_features_at_64px(monkeypatch):
    """Live feature matrices, counted as collect_features hands them over and freed: never more than the widest
    layer's at once (before the fix, every layer of a small model shared one pass and was held together)."""
    data = generated(classes=5, per=6, size=64)
    seed_everything(0)
    model = build_model("resnet18_narrow", 5, image_size=64).eval()
    live, peak = [0], [0]
    original = kq.collect_features

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        for fa, _, _ in out.values():
            live[0] += fa.numel() * fa.element_size()
            weakref.finalize(fa, lambda n=fa.numel() * fa.element_size(): live.__setitem__(0, live[0] - n))
        peak[0] = max(peak[0], live[0])
        return out

    monkeypatch.setattr(kq, "collect_features", counting)
    table = kq.layer_qualities(model, data, probe=False, cache_dir=None, progress=False)
    widest = int(table["dim"].max()) * int(table.attrs["n_a"]) * 4
    assert table["dim"].sum() > 1.5 * table["dim"].max()          # the layers together would be much more
    assert 0 < peak[0] <= widest and live[0] == 0


_MEASURE_CELL = textwrap.dedent("""
    import json, math, sys
    import nbformat, torch
    from kdutils.data import Dataset
    from kdutils.geometry import class_balanced_sample, layer_outputs
    from kdutils.kq import knowledge_quality, layer_qualities
    from kdutils.models import build_model
    from kdutils.precision import precision_for
    torch.set_num_threads(1)
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 10
    x = torch.randint(0, 256, (120, 3, 64, 64), dtype=torch.uint8, generator=g)
    data = Dataset("gen", x, y, x[:20], y[:20], tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    teacher = build_model("resnet18_narrow", 10, image_size=64).eval()
    qualities = layer_qualities(teacher, data, [8, 9], max_samples=5000, per_class=50, probe=False,
                                cache_dir=None, progress=False)
    qualities.loc[0, ["dim", "quality"]] = 32 * 64 * 64, 1e9    # pretend the widest layer (32x64x64) scored highest
    cell = next(c.source for c in nbformat.read(sys.argv[1], as_version=4).cells
                if c.cell_type == "code" and "by hand" in c.source)
    cell = cell.replace("(gib <= 1)", "(gib <= 1 / 64)")      # this test's scale: a 16 MiB budget
    ns = {"qualities": qualities, "data": data, "teacher": teacher, "device": torch.device("cpu"), "seed": 0,
          "config": {"kq_samples": 5000, "kq_per_class": 50}, "math": math, "torch": torch,
          "class_balanced_sample": class_balanced_sample, "layer_outputs": layer_outputs,
          "knowledge_quality": knowledge_quality, "precision_for": precision_for}
    open("/proc/self/clear_refs", "w").write("5")            # the high-water mark starts here
    before, error = status("VmRSS"), None
    try:
        exec(cell, ns)
    except AssertionError as e:
        error = repr(e)[:200]
    print(json.dumps({"growth": status("VmHWM") - before, "layer": ns.get("layer"), "error": error}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_notebook3_by_hand_check_stays_in_bounded_memory_at_64px():
    """Notebook 3's by-hand Q holds several float64 copies of one layer's sampled features: on the widest layer at
    64 px that was 10.6 GB for 1,000 images. It now takes the best layer whose features fit its budget."""
    notebook = ROOT / "notebooks" / "03_compute_kq.ipynb"
    run = subprocess.run([sys.executable, "-c", _MEASURE_CELL, str(notebook)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    widest = 120 * 32 * 64 * 64 * 8                              # layer 0 of the sample as float64: 120 MiB
    assert result["growth"] < 300 * 2**20 < 3 * widest, result    # before the fix: about 640 MB
    assert result["error"] is None and result["layer"] != 0
    assert "(layer 0 has the highest Q, but its features of the sample take 0.1 GiB as float64)" in run.stdout
