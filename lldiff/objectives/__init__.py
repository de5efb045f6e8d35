"""The objective registry: every objective lldiff trains, in one place.

An objective is a name: ``ar`` (next-token prediction, causal attention), ``mdm`` (LLaDA's
masked diffusion, bidirectional attention) or ``bd3-B`` (BD3-LM block diffusion with blocks of
``B`` tokens, SPEC §9; ``bd3-1`` is next-token prediction with a mask token, ``bd3-L`` the
MDM). Each lives in its own folder, ``lldiff/objectives/<family>/``: its losses and validation
bound (``loss.py``), its decoder (``decoding.py``), its likelihood and multiple-choice scorer
(``likelihood.py``) and its LightningModules (``modules.py``); the folder's ``__init__`` holds its
:class:`Family` entry. What several share (the forward process, remasking rules, CFG, the SFT
base) is in ``lldiff/objectives/common/``.

Code that must know what differs asks the registry (:func:`get`, :func:`of_model`,
:func:`from_record`); it never branches on a name or on the attention kind itself.

Adding an objective: one folder with a ``FAMILY`` entry, and one line naming it under the
``lldiff.objectives`` entry points of ``pyproject.toml`` (another package: under its own; a test or
a notebook: a call of :func:`register`).

What an objective is, as data, and the lookups (by name, from a checkpoint's record, of a
model) are in :mod:`lldiff.registry`, which every layer below the objectives' own code asks.
"""

from lldiff.registry import (ATTENTION_KINDS, FAMILIES, Code, families, Family, Objective, Style, UnknownObjective, allowed,
                             article, from_record, get, is_known, legacy_class, legacy_objective, of_checkpoint,
                             of_model, of_module, register, with_params)

__all__ = ["ATTENTION_KINDS", "Code", "FAMILIES", "families", "Family", "Objective", "Style", "UnknownObjective", "allowed",
           "article", "from_record", "get", "is_known", "legacy_class", "legacy_objective", "of_checkpoint",
           "of_model", "of_module", "register", "with_params"]
