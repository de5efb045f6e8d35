"""What the README and the command help say agrees with what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from lldiff.sweep.plan import make_plan
from lldiff.sweep.spec import load_preset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_demo_run_count_is_the_plans():
    match = re.search(r"\(`make demo`, [^)]*?: (\d+) runs;", README.read_text())
    assert match, "README no longer states the demo's run count"
    assert int(match.group(1)) == len(make_plan(load_preset("demo")))


def test_eval_help_and_readme_describe_the_truth_rank_the_same_way():
    """The held-out task's truth is the choice at a rank running through a shuffled 0..n-1 per block
    (lldiff.evaluation.tasks): neither text may say it merely cycles, or is simply random."""
    from lldiff.evaluation.cli import DESCRIPTION

    readme = " ".join(README.read_text().split())
    help_text = " ".join(DESCRIPTION.split())
    for text in (readme, help_text):
        assert "shuffled 0.." in text
    assert "cycles through their rank" not in readme
    assert "the truth is a random one of them" not in help_text
