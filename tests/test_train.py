"""fit learns, checkpoints are atomic and round-trip, and an interrupted run resumes exactly."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdutils.data import load_dataset
from kdutils.models import build_model
from kdutils.checkpoints import checkpoint_finished, load_checkpoint, save_checkpoint
from kdutils.train import evaluate, fit, make_optimizer, seed_everything, state_fingerprint


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small(ds, n_train=256, n_test=128):
    """A deterministic slice of a dataset, for fast loop tests."""
    import dataclasses
    return dataclasses.replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                               x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


def test_fit_learns_digits(digits):
    seed_everything(0)
    model = build_model("resnet10_narrow", digits.num_classes)
    history = fit(model, digits, epochs=4, lr=0.0075, seed=0, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["test_acc"] > 0.85
    assert history[-1]["loss"] < history[0]["loss"]
    assert set(history[0]) >= {"epoch", "loss", "train_acc", "test_acc", "seconds", "lr"}
    # evaluate agrees with the history's last test accuracy
    assert evaluate(model, digits.x_test, digits.y_test, mean=digits.mean, std=digits.std) == pytest.approx(
        history[-1]["test_acc"])


def test_checkpoint_roundtrip_and_reuse(digits, tmp_path):
    ds = small(digits)
    seed_everything(1)
    model = build_model("resnet10_narrow", ds.num_classes)
    ck = tmp_path / "run" / "model.pt"
    history = fit(model, ds, epochs=2, lr=0.005, seed=1, checkpoint=ck, meta={"model": "resnet10_narrow"},
                  progress=False)
    state = load_checkpoint(ck)
    assert state["epoch"] == 2 and state["history"] == history
    assert state["meta"]["model"] == "resnet10_narrow" and state["meta"]["seed"] == 1
    assert state["meta"]["dataset"] == "digits" and state["meta"]["num_classes"] == 10
    assert state["meta"]["accuracy"] == history[-1]["test_acc"]
    assert "torch" in state["meta"]["versions"]
    fresh = build_model("resnet10_narrow", ds.num_classes)
    fresh.load_state_dict(state["model"])
    assert state_fingerprint(fresh) == state_fingerprint(model)

    # a finished checkpoint is reused: no training step runs
    def boom(*args):
        raise AssertionError("training should not run for a finished checkpoint")
    again = build_model("resnet10_narrow", ds.num_classes)
    assert fit(again, ds, epochs=2, lr=0.005, seed=1, checkpoint=ck, loss_fn=boom, progress=False) == history
    assert state_fingerprint(again) == state_fingerprint(model)

    # a checkpoint from a different configuration is refused, naming the fix
    with pytest.raises(ValueError, match="delete it"):
        fit(build_model("resnet10_narrow", 10), ds, epochs=3, lr=0.005, seed=1, checkpoint=ck, progress=False)


def test_resume_after_interruption_matches_uninterrupted_run(digits, tmp_path):
    ds = small(digits)

    def run(checkpoint, interrupt_at=None):
        calls = {"n": 0}

        def loss_fn(model, xb, yb, idx):
            calls["n"] += 1
            if interrupt_at is not None and calls["n"] == interrupt_at:
                raise KeyboardInterrupt
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits
        seed_everything(3)
        model = build_model("resnet10_narrow", ds.num_classes)
        return model, fit(model, ds, epochs=3, lr=0.005, seed=3, augment=True, loss_fn=loss_fn,
                          checkpoint=checkpoint, progress=False)

    ref_model, ref_hist = run(tmp_path / "ref.pt")
    ck = tmp_path / "interrupted.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ck, interrupt_at=2 * 2 + 1)  # 2 steps per epoch: dies in the middle of epoch 3
    assert load_checkpoint(ck)["epoch"] == 2
    resumed_model, resumed_hist = run(ck)
    assert [h["epoch"] for h in resumed_hist] == [1, 2, 3]
    for a, b in zip(ref_hist, resumed_hist):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["test_acc"] == b["test_acc"]
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_save_is_atomic_and_corrupt_files_are_reported(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.ones(3)})

    def failing_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]        # no temporary file left behind

    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="delete it"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="train"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_finished_counts_only_complete_readable_runs(tmp_path):
    """A run counts as finished when its checkpoint trained all epochs; missing or damaged ones count as not."""
    path = save_checkpoint(tmp_path / "run.pt", {"epoch": 3})
    assert checkpoint_finished(path, 3) and checkpoint_finished(path, 2) and not checkpoint_finished(path, 4)
    assert not checkpoint_finished(tmp_path / "missing.pt", 1) and not checkpoint_finished(None, 1)
    path.write_bytes(b"not a checkpoint")
    assert not checkpoint_finished(path, 1)


def test_fingerprint_changes_with_weights():
    seed_everything(0)
    m = build_model("resnet10_narrow", 10)
    before = state_fingerprint(m)
    with torch.no_grad():
        next(m.parameters())[0].add_(1e-3)
    assert state_fingerprint(m) != before


def test_load_model_rebuilds_a_trained_checkpoint(digits, tmp_path):
    ds = small(digits, 128, 64)
    seed_everything(4)
    model = build_model("resnet10_narrow", ds.num_classes)
    ck = tmp_path / "m.pt"
    fit(model, ds, epochs=1, lr=0.005, seed=4, checkpoint=ck, meta={"model": "resnet10_narrow", "image_size": 32},
        progress=False)
    from kdutils.train import load_model
    loaded = load_model(ck, device="cpu")
    assert not loaded.training and state_fingerprint(loaded) == state_fingerprint(model)
    save_checkpoint(tmp_path / "nometa.pt", {"model": model.state_dict(), "meta": {}})
    with pytest.raises(ValueError, match="meta"):
        load_model(tmp_path / "nometa.pt")


def test_backbone_lr_scale_slows_everything_but_the_head(digits):
    """The paper fine-tunes pretrained teachers with the backbone at 0.01 x the head's LR (METHOD.md section 7)."""
    ds = small(digits, 128, 32)
    changes = {}
    for scale in (1.0, 1e-6):
        seed_everything(0)
        model = build_model("resnet10_narrow", ds.num_classes, image_size=16)
        before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        fit(model, ds, epochs=1, lr=0.01, batch_size=32, seed=0, progress=False, backbone_lr_scale=scale)
        after = model.state_dict()
        moved = {k: (after[k] - v).abs().max().item() for k, v in before.items() if "running" not in k}
        changes[scale] = (max(v for k, v in moved.items() if not k.startswith("fc.")),
                          min(v for k, v in moved.items() if k.startswith("fc.")))
    (backbone_full, head_full), (backbone_slow, head_slow) = changes[1.0], changes[1e-6]
    assert backbone_full > 1e-3 and head_full > 1e-3
    assert backbone_slow < 1e-5 < head_slow  # the head still trains at the full LR
    with pytest.raises(ValueError, match="backbone_lr_scale must be in"):
        fit(build_model("resnet10_narrow", 10), ds, epochs=1, lr=0.01, backbone_lr_scale=0.0, progress=False)


def test_long_schedule_is_sgd_with_lr_steps_at_scaled_milestones(digits):
    ds = small(digits, 256, 32)                  # 2 steps per epoch
    seed_everything(0)
    model = build_model("resnet10_narrow", ds.num_classes)
    history = fit(model, ds, epochs=8, lr=0.05, weight_decay=5e-4, schedule="long", progress=False)
    # milestones 150/180/210 of 240 scale to epochs 5, 6 and 7 of 8: the LR after each epoch
    assert [h["lr"] for h in history] == pytest.approx([0.05] * 4 + [0.005, 5e-4, 5e-5, 5e-5])
    with pytest.raises(ValueError, match="unknown schedule"):
        fit(model, ds, epochs=1, lr=0.05, schedule="step", progress=False)


@pytest.mark.parametrize("schedule", ["onecycle", "long"])
def test_optimizers_update_all_tensors_at_once_with_the_same_numbers(schedule):
    """make_optimizer's foreach AdamW/SGD (the CPU's faster path) gives bit-identical weights to one tensor at a
    time, so committed runs trained before the switch still reproduce."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    weights = []
    for foreach in (True, False):
        torch.manual_seed(1)
        model = build_model("resnet10_narrow", 10, image_size=16)
        opt, sched = make_optimizer(model, None, lr=0.01, backbone_lr_scale=0.1, weight_decay=5e-4,
                                    schedule=schedule, epochs=2, steps=3)
        assert all(g["foreach"] for g in opt.param_groups)
        for group in opt.param_groups:
            group["foreach"] = foreach
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.manual_seed(1)
    init = torch.cat([p.detach().flatten() for p in build_model("resnet10_narrow", 10, image_size=16).parameters()])
    assert (weights[0] - init).abs().max() > 1e-4          # the steps did move the weights
    assert torch.equal(weights[0], weights[1])
