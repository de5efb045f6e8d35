"""Zero-shot multiple-choice evaluation (SPEC §5): ``lldiff eval``.

* :mod:`.multiple_choice`: scoring choices by log-likelihood (each objective's scorer, in
  ``lldiff/objectives/<family>/likelihood.py``: AR exact, MDM and BD3 Monte-Carlo lower bounds) and accuracy / length-normalised accuracy.
* :mod:`.tasks`: the JSONL task format and the built-in offline ``heldout-continuation`` task.
* :mod:`.cli`: the ``lldiff eval`` command.
"""

from .multiple_choice import NORMALISATION, evaluate_multiple_choice, example_seed
from .tasks import (
    BUILTIN_TASKS,
    HELDOUT_TASK,
    Example,
    build_heldout_task,
    heldout_texts,
    load_jsonl_task,
    save_jsonl_task,
)

__all__ = [
    "BUILTIN_TASKS", "HELDOUT_TASK", "NORMALISATION", "Example", "build_heldout_task",
    "evaluate_multiple_choice", "example_seed", "heldout_texts", "load_jsonl_task",
    "save_jsonl_task",
]
