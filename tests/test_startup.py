"""`lldiff --help` starts fast: it lists the strategy names without importing Lightning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_lightning_or_torch():
    code = ("import sys; from lldiff.cli import main; main(['--help']); "
            "heavy = sorted(m for m in ('lightning', 'torch', 'lightning.pytorch') if m in sys.modules); "
            "print('HEAVY', heavy)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert "Strategies (trainer.strategy): auto, ddp, fsdp2" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_listed_strategy_names_are_the_registered_ones():
    """The static list the overview prints names strategies Lightning really accepts."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lldiff.strategies import allowed_names
    from lldiff.strategy_names import PRESETS

    assert set(PRESETS) - {"auto"} <= set(StrategyRegistry.available_strategies())  # auto: Trainer's default
    assert allowed_names()[: len(PRESETS)] == list(PRESETS)
