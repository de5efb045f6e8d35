"""lldiff: masked diffusion language models against autoregressive baselines on Lightning."""

import warnings as _warnings

# Known third-party noise, silenced here (the package's import) so that no entry point repeats it:
# Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds torch's deprecated
# ``LeafSpec`` on every fit, and torch warns about that code, not ours, twice per run.
_warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)


class _DropLightningAdverts:
    """A ``logging`` filter for Lightning's product tips (one per fit: "💡 Tip: ... LitLogger")."""

    @staticmethod
    def filter(record: object) -> bool:
        return not str(getattr(record, "msg", "")).startswith("💡 Tip:")


def _silence_lightning_adverts() -> None:
    import logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningAdverts())


_silence_lightning_adverts()
