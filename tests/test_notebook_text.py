"""Text that stays true: no committed notebook's markdown states a run-specific figure (#21 item 4).

Run-specific statements (accuracies, rhos, intervals, times, dates, "the committed run showed ...") belong in code
cells that print them from the run's results; markdown says what to look for and why. The scanner ignores maths
($...$), code spans and a self-check question that starts with "Suppose" (an explicitly hypothetical example).
"""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

# What a run-specific figure looks like in prose, by kind.
FIGURES = {
    "a decimal percentage": r"\d+\.\d+\s?\\?%",
    "a signed decimal (a rho, a difference in points)": r"(?<![\w.])[+\-−]\d*\.\d+",
    "a ± spread": r"±\s?\d",
    "a duration": r"\b\d[\d.,]*\s?(?:s|sec|seconds|min|minutes|h|hours)\b",
    "a date": r"\b20\d\d-\d\d-\d\d\b",
    "prose about one particular run": r"\b(?:these outputs|outputs shown|in the committed|the committed [`\w-]+ run)\b",
}


def run_specific_figures(markdown: str) -> list[str]:
    """Each run-specific figure in a markdown text, as 'kind: the text around it'."""
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]*\$", " ", markdown, flags=re.S)           # maths
    text = re.sub(r"`[^`\n]*`", " ", text)                                          # code spans
    text = re.sub(r"<summary>\s*Suppose.*?</summary>", " ", text, flags=re.S | re.I)  # hypothetical questions
    found = []
    for kind, pattern in FIGURES.items():
        for m in re.finditer(pattern, text, flags=re.I):
            found.append(f"{kind}: ...{text[max(0, m.start() - 40):m.end() + 20]}...".replace("\n", " "))
    return found


def test_the_scanner_catches_what_went_stale_before():
    stale = [
        "the teacher reaches 60.85% after 10 epochs",
        "Depth orders the layers best (+0.98 [+0.79, +1.00])",
        "the standard layers (54.80% ± 0.28)",
        "`quick` about 5 minutes (4 min 55 s, notebooks 1-6)",
        "on 2 CPU cores on 2026-12-02",
        "In the committed `cifar10-cpu` run the cosines are positive",
        "> **The outputs shown here** come from one real run",
    ]
    for line in stale:
        assert run_specific_figures(line), line
    fine = [
        "$$I = (1 - \\overline{\\mathrm{MinIntra}_c}) \\, \\frac{\\overline{H_c}}{\\ln 5}$$ with a factor $0.5$",
        "`-p student_lr 0.0075` and `k = 4`; the 95% interval, 10% of the training images, ResNet34 → ResNet9",
        "<details><summary>Suppose a method beats CE by 0.8 points; its interval is [-0.4, +2.0].</summary>",
        "Every number in the text below is printed by a code cell of the run you are reading.",
    ]
    for line in fine:
        assert not run_specific_figures(line), (line, run_specific_figures(line))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_states_no_run_specific_figure(path):
    cells = json.loads(path.read_text())["cells"]
    found = [f"cell {i}: {hit}" for i, c in enumerate(cells) if c["cell_type"] == "markdown"
             for hit in run_specific_figures("".join(c["source"]))]
    assert not found, (f"{path.name} states run-specific figures in markdown; print them from the run's results in "
                       f"a code cell instead:\n" + "\n".join(found))
