"""lldiff: masked diffusion language models against autoregressive baselines on Lightning."""

import warnings as _warnings

# Known third-party noise, silenced here (the package's import) so that no entry point repeats it:
# Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds torch's deprecated
# ``LeafSpec`` on every fit, and torch warns about that code, not ours, twice per run.
_warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)

# Lightning warns on every mid-epoch resume that "your dataloader is not resumable" because it
# only asks the DataLoader object; lldiff's datamodules record the data order in every checkpoint
# and fast-forward their sampler (lldiff.data.resumable), so a resume replays the exact batches.
_warnings.filterwarnings(
    "ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is"
    r" not resumable",
)


from lldiff.quiet import silence_noise as _silence_noise  # noqa: E402  (Lightning's and Optuna's banners)

_silence_noise()
