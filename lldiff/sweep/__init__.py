"""Scaling sweeps: spec -> plan -> runs (local or cluster) -> results table -> analysis.

Modules: ``spec`` (the YAML spec), ``plan`` (runs and their steps from C = 6 N D),
``runner`` (local execution, resume, results), ``results`` (atomic results table),
``cluster`` (plan table, SLURM / torchrun scripts), ``analysis`` / ``figures`` / ``report``
(iso-FLOP fits, scaling laws, compute multiplier). Import the submodule you need; this
package stays light so the analysis does not pull in Lightning.
"""
