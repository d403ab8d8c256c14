"""Tests of what notebook 4 teaches with: the layer-pair diagram (kdutils.plots.plot_layer_pairs), the hand-written
CE-free training step (the notebook's own cells, run against kdutils.distill on several architectures), and the
notebook's structure (the from-scratch cell with its asserts, "Try next" at the end)."""
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.text import Text

from kdutils.data import Dataset
from kdutils.layers import layer_table
from kdutils.models import build_model
from kdutils.plots import plot_layer_pairs
from kdutils.train import seed_everything

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_distill_without_ce.ipynb"


def _table(shapes: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame({"index": range(len(shapes)), "path": [f"m{i}" for i in range(len(shapes))],
                         "kind": ["block"] * len(shapes), "shape": shapes})


TEACHER = _table([(32, 16, 16)] * 3 + [(64, 8, 8)] * 2 + [(128, 4, 4)] * 2 + [(256, 2, 2)] * 2 + [(256,)])
STUDENT = _table([(16, 16, 16), (16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2), (128,)])
PAIRS = [(1, 5), (2, 6), (3, 7), (4, 9)]


def _gid(artist) -> str:
    return artist.get_gid() or ""


def _by_gid(fig, cls, prefix: str) -> list:
    return [a for a in fig.findobj(cls) if _gid(a).startswith(prefix)]


def _box_span(fig, gid: str) -> tuple[float, float]:
    """(top, bottom) data y of a layer box (the y axis is inverted: depth grows downwards)."""
    (box,) = [p for p in fig.findobj(FancyBboxPatch) if _gid(p) == gid]
    return box.get_y(), box.get_y() + box.get_height()


def test_layer_pairs_draws_one_arrow_per_pair_from_teacher_to_student_box():
    fig = plot_layer_pairs(TEACHER, STUDENT, PAIRS)
    arrows = _by_gid(fig, FancyArrowPatch, "pair:")
    assert sorted(_gid(a) for a in arrows) == sorted(f"pair:{s}-{t}" for s, t in PAIRS)
    for arrow in arrows:
        s, t = map(int, _gid(arrow).removeprefix("pair:").split("-"))
        (x0, y0), (x1, y1) = arrow._posA_posB
        t_top, t_bottom = _box_span(fig, f"layer:teacher:{t}")
        s_top, s_bottom = _box_span(fig, f"layer:student:{s}")
        assert t_top <= y0 <= t_bottom and s_top <= y1 <= s_bottom, _gid(arrow)   # starts at t, ends at s
        assert x0 < x1                                                         # teacher column on the left
    labels = {_gid(t): t.get_text() for t in _by_gid(fig, Text, "pair:")}
    assert labels["pair:1-5:label"] == "P1: 1\u00d71 16\u2192128"                  # student -> teacher channels
    assert labels["pair:4-9:label"] == "P4: 1\u00d71 128\u2192256"                 # a vector counts as C x 1 x 1


def test_layer_pairs_marks_the_stop_gradient_after_the_deepest_distilled_layer():
    fig = plot_layer_pairs(TEACHER, STUDENT, PAIRS)
    (bar,) = [line for line in fig.findobj(Line2D) if _gid(line) == "stop-gradient"]
    y_bar = set(bar.get_ydata())
    assert len(y_bar) == 1
    y_bar = y_bar.pop()
    assert _box_span(fig, "layer:student:4")[1] < y_bar < _box_span(fig, "layer:student:5")[0]
    (label,) = [t for t in fig.findobj(Text) if _gid(t) == "stop-gradient:label"]
    assert "stop-gradient after layer 4" in label.get_text()
    # the head (layer 5 and the classifier) is coloured apart from the backbone
    face = {g: p.get_facecolor() for p in fig.findobj(FancyBboxPatch) if (g := _gid(p))}
    assert face["layer:student:5"] == face["head:student"] != face["layer:student:4"]
    assert face["layer:student:0"] != face["layer:student:1"]                 # distilled layers stand out
    # an explicit stop point moves the bar
    fig = plot_layer_pairs(TEACHER, STUDENT, PAIRS, stop_after=3)
    (bar,) = [line for line in fig.findobj(Line2D) if _gid(line) == "stop-gradient"]
    assert _box_span(fig, "layer:student:3")[1] < bar.get_ydata()[0] < _box_span(fig, "layer:student:4")[0]


def test_layer_pairs_labels_every_layer_inside_its_box_and_the_figure():
    fig = plot_layer_pairs(TEACHER, STUDENT, PAIRS, title="narrow pair")
    texts = {_gid(t): t for t in fig.findobj(Text) if _gid(t)}
    for role, table in (("teacher", TEACHER), ("student", STUDENT)):
        for _, row in table.iterrows():
            text = texts[f"layer:{role}:{row['index']}:label"].get_text()
            shape = "\u00d7".join(map(str, row["shape"]))
            assert re.fullmatch(rf"\s*{row['index']}\s+{row['path']}\s+{shape}", text), text
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.bbox
    boxes = {_gid(p): p.get_window_extent(renderer) for p in fig.findobj(FancyBboxPatch) if _gid(p)}
    for gid, text in texts.items():
        extent = text.get_window_extent(renderer)
        assert page.x0 <= extent.x0 and extent.x1 <= page.x1 and page.y0 <= extent.y0 and extent.y1 <= page.y1, gid
        if gid.endswith(":label") and gid.removesuffix(":label") in boxes:      # a layer's label fits its box
            box = boxes[gid.removesuffix(":label")]
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, gid


def test_layer_pairs_on_real_layer_tables_and_bad_pairs():
    teacher, student = build_model("resnet18_narrow", 10, 16), build_model("resnet10_narrow", 10, 16)
    t_table, s_table = layer_table(teacher, 16).set_index("index"), layer_table(student, 16)   # either form
    fig = plot_layer_pairs(t_table, s_table, [(1, 5), (2, 6), (3, 7), (4, 8)])
    assert len(_by_gid(fig, FancyArrowPatch, "pair:")) == 4
    assert len(_by_gid(fig, FancyBboxPatch, "layer:teacher:")) == len(t_table)
    assert len(_by_gid(fig, FancyBboxPatch, "layer:student:")) == len(s_table)
    with pytest.raises(ValueError, match="teacher layer 42"):
        plot_layer_pairs(t_table, s_table, [(1, 42)])


# ----------------------------------------------------------------------------------------------------------------
# the notebook's hand-written step, executed against kdutils.distill.distill_loss

def _notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(marker: str) -> str:
    (source,) = [c.source for c in _notebook().cells if c.cell_type == "code" and marker in c.source]
    return source


def _data(image_size: int, n: int = 64, classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    return Dataset("synthetic", x, y, x[:8], y[:8], tuple(map(str, range(classes))), (0.5,) * 3, (0.25,) * 3)


def _narrow_with_dropout(name: str, num_classes: int, image_size: int) -> torch.nn.Module:
    """A kdutils model whose classifier starts with dropout (as VGG's does): the head draws random masks."""
    model = build_model(name, num_classes, image_size)
    model.fc = torch.nn.Sequential(torch.nn.Dropout(0.5), model.fc)
    return model


def _small_vit(name: str, num_classes: int, image_size: int) -> torch.nn.Module:
    """A 4-block torchvision ViT (17 tokens of width 32): token features, Conv1d projectors, an input-hooked layer 0."""
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=image_size, patch_size=4, num_layers=4, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=num_classes)


@pytest.mark.parametrize("builder, teacher_name, student_name, image_size, teacher_layers, student_layers", [
    # student maps larger than the teacher's (pooled down), and a pooled vector (layer 9) as a target
    (build_model, "resnet18_narrow", "resnet10_narrow", 16, [5, 6, 7, 9], [1, 2, 3, 4]),
    # dropout in the head: both versions must draw the same masks
    (_narrow_with_dropout, "resnet18_narrow", "resnet10_narrow", 16, [3, 4, 7, 8], [1, 2, 3, 4]),
    # ViT tokens: (B, T, W) features, Conv1d projectors
    (_small_vit, "vit", "vit", 16, [2, 3, 4], [1, 2, 3]),
], ids=["resnet", "dropout-head", "vit-tokens"])
def test_the_hand_written_step_matches_distill_loss(builder, teacher_name, student_name, image_size, teacher_layers,
                                                    student_layers, capsys):
    data = _data(image_size)
    seed_everything(1)
    teacher = builder(teacher_name, data.num_classes, image_size)
    ns = {"teacher": teacher, "config": {"student": student_name}, "data": data, "seed": 3,
          "teacher_layers": teacher_layers, "student_layers": student_layers, "build_model": builder,
          "seed_everything": seed_everything}
    exec(_cell("register_forward_hook"), ns)                 # the step by hand
    exec(_cell("distill_loss("), ns)                          # kdutils' step and the asserts
    out = capsys.readouterr().out
    assert "by hand: loss" in out and "gradients agree" in out
    assert all(p.grad is not None for p in ns["mine"].parameters())      # every student tensor was compared


def test_the_hand_written_step_notices_a_missing_detach():
    """Without the stop-gradient the hand-written step is a different method: the notebook's asserts must fail."""
    data = _data(16)
    seed_everything(1)
    teacher = build_model("resnet18_narrow", data.num_classes, 16)
    ns = {"teacher": teacher, "config": {"student": "resnet10_narrow"}, "data": data, "seed": 0,
          "teacher_layers": [5, 6, 7, 8], "student_layers": [1, 2, 3, 4], "build_model": build_model,
          "seed_everything": seed_everything}
    source = _cell("register_forward_hook")
    leaky = source.replace("output.detach() if", "output if")
    assert leaky != source
    exec(leaky, ns)
    with pytest.raises(AssertionError):
        exec(_cell("distill_loss("), ns)


# ----------------------------------------------------------------------------------------------------------------
# the notebook's structure

def test_notebook_4_has_the_from_scratch_cell_the_diagram_and_ends_with_try_next():
    nb = _notebook()
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    scratch = _cell("register_forward_hook")
    for piece in ("register_forward_hook", ".detach()", "extract(teacher", "adaptive_avg_pool", "Conv2d",
                  "F.mse_loss", "F.cross_entropy", ".backward()"):
        assert piece in scratch, piece
    compare = _cell("distill_loss(")
    assert compare.count("torch.testing.assert_close") >= 4 and "cache_budget_mb=0" in compare
    assert any("plot_layer_pairs(" in c for c in code)
    assert any('["terms"]' in c for c in code)                # the feature and CE terms plotted separately
    assert "Part 4 of 6" in text and "Part 4 of 5" not in text
    assert "notebook 5" in text.lower() and "cosine" in text.lower()       # where the conflict is measured
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and last.source.lstrip().startswith("## Try next")
    exercises = re.findall(r"^\d+\. \*\*", last.source.split("## Check yourself")[0], flags=re.M)
    assert 3 <= len(exercises) <= 5
    assert 2 <= last.source.count("<details><summary>") <= 3
    assert last.source.count("<details>") == last.source.count("</details>")
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert sum("parameters" in t for t in tags) == 1
    assert "data = rundir.series_data(config, data_root)" in "\n".join(code)
