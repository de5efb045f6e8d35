"""`lldiff tune`: Optuna hyperparameter search over ordinary `lldiff fit` runs.

Modules, one job each:

- ``space``    the search-space file: parameters, ranges, and the init arg each one sets
- ``setup``    the base fit config of a study and the full config of one trial
- ``storage``  storage URLs (SQLite by default, any RDB URL, journal files) and the claim lock
- ``pruning``  ``StepPruningCallback``: reports validation keyed on the global step, prunes
- ``study``    create/join a study, run trials until the study holds ``n_trials``, summaries
- ``export``   write the best parameters into a sweep spec's ``size_args``
- ``cli``      the ``lldiff tune run|best`` command
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TuneError(ValueError):
    """Bad input to a search (space, config, storage, study): raised before any trial runs."""


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of ``path``; a missing or unparsable file is a ``TuneError`` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise TuneError(f"{what} {str(path)!r} does not exist")
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TuneError(f"{what} {str(path)!r} is not valid YAML: {error}") from None
