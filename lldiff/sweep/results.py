"""The sweep's results table: one CSV row per finished run, written atomically, never twice."""

from __future__ import annotations

import csv
import fcntl
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from lldiff.atomic import write_text
from lldiff.run_lock import open_lock_file

RESULTS_FILE = "results.csv"
"""A sweep directory's table of finished runs."""

COLUMNS = [
    "run_id", "objective", "size", "n_nonemb", "budget", "seed", "max_steps", "tokens", "compute", "flops",
    "flops_6nd", "flops_matmul", "unique_tokens", "epochs", "val_nll_per_token", "val_bpb", "val_mc_samples",
    "wall_time_s", "lr", "warmup_steps", "batch_size", "seq_len", "vocab_size", "random_length_prob",
    "spec_fingerprint", "finished_at",
]


class ResultsTable:
    """``results.csv`` of a sweep directory, safe for several writer processes."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_lock_file(self.path.with_suffix(".lock"))  # never truncated, never through a link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        foreign = {r.get("spec_fingerprint") for r in rows} - {self.fingerprint}
        if foreign:
            raise ValueError(
                f"{self.path} holds results of a different sweep spec (fingerprint {sorted(foreign)} != "
                f"{self.fingerprint}); use another --out directory. Nothing was overwritten."
            )
        return rows

    def run_ids(self) -> set[str]:
        return {row["run_id"] for row in self.rows()}

    def record(self, row: dict[str, Any]) -> bool:
        """Append ``row`` unless its run is already recorded; returns whether it was added."""
        with self._locked():
            rows = self.rows()
            if any(r["run_id"] == row["run_id"] for r in rows):
                return False
            rows.append({**row, "spec_fingerprint": self.fingerprint})
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            write_text(self.path, buffer.getvalue())
            return True


def read_results(directory: str | Path, what: str = "sweep") -> pd.DataFrame:
    """``directory/results.csv`` as a data frame (what an analysis reads; no fingerprint check).

    Raises:
        FileNotFoundError: no results.csv (``what`` names the directory's role in the message).
        ValueError: the file is empty.
    """
    path = Path(directory) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{what} directory {directory} has no {RESULTS_FILE}: has it finished any run?")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{path} is empty: no finished runs") from err
    if df.empty:
        raise ValueError(f"{path} is empty: no finished runs")
    return df
