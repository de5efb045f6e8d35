"""Safetensors directories as Hugging Face writes them: one ``model.safetensors`` or shards
named by ``model.safetensors.index.json``. Nothing here unpickles: safetensors files are a
JSON header plus raw bytes, and names and shapes are read from the headers alone, so a
directory can be checked completely before any weight is allocated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: Path) -> dict[str, Path]:
    """``{tensor name: file}`` for a directory's weights (the index's map, or one file's
    header). Refuses a directory without weights and an index naming a missing shard."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a safetensors index (no readable weight_map: {error})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: weight_map must map tensor names to shard files; it is empty or not a map")
        shards = sorted(set(weight_map.values()))
        for shard in shards:  # a shard must be a plain file name inside the directory
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise ValueError(f"{index} names shard {shard!r}, which is not a file name inside {directory}")
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) missing from {directory}: {', '.join(missing)} "
                                    f"({len(shards) - len(missing)} of {len(shards)} present)")
        return {name: directory / shard for name, shard in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        return {name: single for name in header_shapes(single)}
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(others)}: pickle files, never read; convert them to safetensors)" if others else ""
    raise FileNotFoundError(f"{directory} holds no weights: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from one file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{file} is not a readable safetensors file ({type(error).__name__}: {error})") from None


def all_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor the map names (headers only); a name the index promises but its
    shard lacks is refused."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        header = header_shapes(file)
        absent = [n for n in names if n not in header]
        if absent:
            raise ValueError(f"{file.name} lacks tensor(s) its index names: {', '.join(sorted(absent)[:5])}")
        shapes.update({n: header[n] for n in names})
    return shapes


class TensorReader:
    """Reads named tensors straight onto ``device`` in ``dtype`` (files opened once each)."""

    def __init__(self, files: dict[str, Path], device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        self.files, self.device, self.dtype = files, torch.device(device), dtype
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device=str(self.device))
        tensor = self._handles[file].get_tensor(name)  # type: ignore[attr-defined]
        return tensor if self.dtype is None else tensor.to(self.dtype)


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path,
                      max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or, when they exceed ``max_shard_bytes``,
    as ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    meta = {"format": "pt", **(metadata or {})}
    names = list(tensors)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if max_shard_bytes is not None and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    directory.mkdir(parents=True, exist_ok=True)
    if len(groups) == 1:
        path = directory / SINGLE_FILE
        save_file({n: tensors[n].contiguous() for n in names}, str(path), metadata=meta)
        return [path]
    written, weight_map = [], {}
    for i, group in enumerate(groups, start=1):
        path = directory / f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(path), metadata=meta)
        weight_map.update({n: path.name for n in group})
        written.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
    return written


def describe(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
