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


class TuneError(ValueError):
    """Bad input to a search (space, config, storage, study): raised before any trial runs."""
