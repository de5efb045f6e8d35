"""Byte-level BPE tokenizer with the mask-token convention of the model.

Convention (fixed by the model, see SPEC §1): the tokenizer holds ``N`` ids; the LAST one is
``<|mask|>``. The model's real vocabulary is ``V = N - 1`` (the LM head outputs V logits) and
the mask id is ``M = V`` (one extra embedding row), so ``[MASK]`` can never be predicted.
``<|eos|>``, ``<|bos|>``, ``<|pad|>`` take ids 0, 1, 2 when trained here.

Literal text such as ``"<|mask|>"`` inside a document never encodes to a special id: the
backend runs with ``encode_special_tokens=True`` (added tokens are not matched in input
text), and the ByteLevel pre-tokenizer splits ``<|mask|>`` into ``<|``, ``mask``, ``|>`` so
BPE merges cannot rebuild it. Encoding is lossless: ``decode(encode(s)) == s`` for any string.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lldiff.atomic import write_text

EOS, BOS, PAD, MASK = "<|eos|>", "<|bos|>", "<|pad|>", "<|mask|>"
SPECIAL_TOKENS = (EOS, BOS, PAD, MASK)
BYTE_ALPHABET_SIZE = 256
SPECIAL_IDS_FILE = "special_ids.json"
"""Beside a ``tokenizer.json`` trained elsewhere: its special ids (see ``Tokenizer._init_external``)."""
SPECIAL_ID_FIELDS = ("vocab_size", "mask_id", "eos_id", "bos_id", "pad_id", "eot_id")
_SPECIAL_LOOKING = re.compile(r"<\|[A-Za-z0-9_]+\|>")
"""What a special token's name looks like in template markup (``<|eot_id|>``)."""
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) - 1
"""Smallest trainable ``vocab_size`` (real tokens V): 256 byte symbols + eos/bos/pad (no merges)."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode table used by the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` that enforces the mask-last convention.

    Attributes:
        vocab_size: the model's real vocabulary size V (all ids except the mask).
        mask_id: ``V``, the last id.
        eos_id, bos_id, pad_id: ids of the other special tokens.
    """

    def __init__(self, backend: _Backend, origin: str = "tokenizer", special_ids: Optional[dict] = None) -> None:
        self.eot_id: Optional[int] = None
        self._token_bytes: Optional[torch.Tensor] = None
        self.external = special_ids is not None  # trained elsewhere: its ids live in special_ids.json
        if special_ids is not None:
            self._init_external(backend, origin, special_ids)
            return
        total = backend.get_vocab_size(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"{origin} lacks special token(s) {missing}; lldiff needs {list(SPECIAL_TOKENS)} "
                f"with {MASK} as the last id"
            )
        mask_id = backend.token_to_id(MASK)
        if mask_id != total - 1:
            raise ValueError(
                f"{origin}: {MASK} has id {mask_id} but must be the last id ({total - 1}); the model "
                f"uses mask id M = V (one past the real vocabulary), so the configured mask id collides with a real token"
            )
        holes = [i for i in range(total) if backend.id_to_token(i) is None]
        if holes:
            raise ValueError(f"{origin}: token ids are not contiguous (no token for ids {holes[:5]}...)")
        backend.encode_special_tokens = True
        self._backend = backend
        self.mask_id = mask_id
        self.vocab_size = mask_id
        self.eos_id = backend.token_to_id(EOS)
        self.bos_id = backend.token_to_id(BOS)
        self.pad_id = backend.token_to_id(PAD)

    def _init_external(self, backend: _Backend, origin: str, ids: dict) -> None:
        """A tokenizer trained elsewhere (an imported LLaDA checkpoint's): its special ids come
        from ``ids`` (``vocab_size``, ``mask_id``, ``eos_id``, ``bos_id``, ``pad_id``,
        optional ``eot_id``), the mask may lie inside the vocabulary, and the model's vocabulary
        may be larger than the tokenizer's (ids past it decode to nothing)."""
        unknown = set(ids) - set(SPECIAL_ID_FIELDS)
        missing = {"vocab_size", "mask_id", "eos_id"} - set(ids)
        if unknown or missing:
            raise ValueError(f"{origin}: special ids need {sorted(SPECIAL_ID_FIELDS)} (vocab_size, mask_id, eos_id "
                             f"required); unknown {sorted(unknown)}, missing {sorted(missing)}")
        vocab_size = ids["vocab_size"]
        total = backend.get_vocab_size(with_added_tokens=True)
        if not isinstance(vocab_size, int) or vocab_size < total:
            raise ValueError(f"{origin}: vocab_size={vocab_size!r} is smaller than the tokenizer's {total} ids")
        for name in ("mask_id", "eos_id", "bos_id", "pad_id", "eot_id"):
            value = ids.get(name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= vocab_size):
                raise ValueError(f"{origin}: {name}={value!r} must be an id in [0, {vocab_size}]")
        backend.encode_special_tokens = True
        self._backend = backend
        self.vocab_size = vocab_size
        self.mask_id = ids["mask_id"]
        self.eos_id = ids["eos_id"]
        self.bos_id = ids.get("bos_id")
        self.pad_id = ids.get("pad_id", self.eos_id)
        self.eot_id = ids.get("eot_id")

    @property
    def document_start_id(self) -> int:
        """The id every pre-training document starts with: EOS in lldiff's packing (it also
        separates documents), BOS for a tokenizer trained elsewhere that has one (LLaDA's
        ``<|startoftext|>``). Prompts, SFT rows and scored contexts start with it."""
        return self.bos_id if self.external and self.bos_id is not None else self.eos_id

    @property
    def mask_inside(self) -> bool:
        """Whether the mask id is one of the vocabulary's (LLaDA) rather than one past it (lldiff)."""
        return self.mask_id < self.vocab_size

    def special_id_dict(self) -> dict:
        """The ids :func:`Tokenizer.from_file` reads back from ``special_ids.json`` (external tokenizers)."""
        return {"vocab_size": self.vocab_size, "mask_id": self.mask_id, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "pad_id": self.pad_id, "eot_id": self.eot_id}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load and validate a ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        sidecar = path.with_name(SPECIAL_IDS_FILE)
        special_ids = None
        if sidecar.is_file():  # a tokenizer trained elsewhere (lldiff import llada): its ids written beside it
            try:
                special_ids = json.loads(sidecar.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{sidecar} is not valid JSON ({error})") from None
            if not isinstance(special_ids, dict):
                raise ValueError(f"{sidecar} must hold a JSON object of special ids, got {special_ids!r}")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as error:  # noqa: BLE001 (the Rust library raises a bare Exception)
            raise ValueError(f"tokenizer {str(path)!r} is not a Hugging Face tokenizers file (tokenizer.json): "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        return cls(backend, origin=f"tokenizer {str(path)!r}", special_ids=special_ids)

    @classmethod
    def from_str(cls, json_str: str) -> "Tokenizer":
        return cls(_Backend.from_str(json_str))

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``tokenizer.json`` atomically (temp file + rename), and for a tokenizer trained
        elsewhere its ``special_ids.json`` beside it; returns the path."""
        path = Path(path)
        write_text(path, self.to_json())
        if self.external:
            write_text(path.with_name(SPECIAL_IDS_FILE), json.dumps(self.special_id_dict(), indent=2) + "\n")
        return path

    def to_json(self) -> str:
        return self._backend.to_str()

    @property
    def backend(self) -> _Backend:
        """The underlying ``tokenizers.Tokenizer`` (with ``encode_special_tokens=True``)."""
        return self._backend

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer JSON (part of token-cache keys)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.eos_id, self.bos_id, self.pad_id, self.mask_id, self.eot_id) if i is not None)

    # -- use ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; literal special-token strings are encoded as plain text."""
        with backend_errors(self._backend):
            return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        with backend_errors(self._backend):
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_marked(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        """Token ids of ``(text, is_markup)`` pieces (a chat template's rendering): special-token
        names in markup (``<|eot_id|>``) become their ids, everything else is encoded as text
        (plain pieces never yield a special id); text between special tokens is encoded whole,
        so a template without special tokens encodes exactly as :meth:`encode` of its text."""
        return self.encode_marked_batch([segments])[0]

    def encode_marked_batch(self, batch: Sequence[Sequence[tuple[str, bool]]]) -> list[list[int]]:
        """:meth:`encode_marked` of many renderings, with one batched call to the backend."""
        specials = self._special_names()
        pattern = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")") \
            if specials else None
        plans: list[list[int | str]] = []  # per rendering: special ids and text runs in order
        for segments in batch:
            plan: list[int | str] = []
            run: list[str] = []
            for text, markup in segments:
                pieces = pattern.split(text) if (markup and pattern is not None) else [text]
                for i, piece in enumerate(pieces):
                    if i % 2:  # a special token's name (the split's captured group)
                        if run:
                            plan.append("".join(run))
                            run = []
                        plan.append(specials[piece])
                    elif piece:
                        run.append(piece)
                if markup:
                    unknown = _SPECIAL_LOOKING.findall("".join(p for i, p in enumerate(pieces) if not i % 2))
                    if unknown:
                        raise ValueError(f"chat template markup names {sorted(set(unknown))}, which the tokenizer "
                                         f"does not have as special tokens (it has {sorted(specials)})")
            if run:
                plan.append("".join(run))
            plans.append(plan)
        texts = [item for plan in plans for item in plan if isinstance(item, str)]
        encoded = iter(self.encode_batch(texts))
        return [[i for item in plan for i in ([item] if isinstance(item, int) else next(encoded))] for plan in plans]

    def _special_names(self) -> dict[str, int]:
        """``{name: id}`` of the backend's special added tokens."""
        return {token.content: i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are rendered (e.g. ``<|eos|>``) unless skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> torch.Tensor:
        """LongTensor (V,): UTF-8 bytes each real token decodes to (0 for special tokens).

        ``token_bytes()[ids].sum()`` is the byte length of the text of ``ids``; used for
        bits per byte. Exact for byte-level tokenizers (tokens that are partial UTF-8
        sequences count their own bytes); other decoders fall back to per-token decoding.
        """
        if self._token_bytes is None:
            table = _byte_decoder() if isinstance(self._backend.decoder, decoders.ByteLevel) else None
            special = set(self.special_ids)
            out = torch.zeros(self.vocab_size, dtype=torch.long)
            for i in range(self.vocab_size):
                if i in special:
                    continue
                token = self._backend.id_to_token(i)
                if token is None:  # an embedding row past the tokenizer (LLaDA pads 126349 ids to 126464)
                    continue
                if table is not None and all(c in table for c in token):
                    out[i] = len(token)
                else:
                    out[i] = len(self._backend.decode([i]).encode("utf-8"))
            self._token_bytes = out
        return self._token_bytes.clone()

    def __len__(self) -> int:
        """Total number of ids including the mask (``vocab_size + 1``; ``vocab_size`` when the
        mask lies inside the vocabulary)."""
        return self.vocab_size + (0 if self.mask_inside else 1)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id}, eos_id={self.eos_id})"


@contextmanager
def backend_errors(backend: _Backend) -> Iterator[None]:
    """Encoding with ``backend`` where a panic of the Rust library (a regex of the tokenizer's
    pre-tokenizer that gives up on a text: "retry-limit-in-match over") is a ValueError naming
    the pre-tokenizer, and the panic's report that Rust writes on stderr is withheld.
    Anything else written on stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    panic = None
    try:
        yield
    except BaseException as error:
        if type(error).__name__ != "PanicException":  # pyo3_runtime.PanicException (a BaseException)
            raise
        panic = error
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if panic is None:
            held.seek(0)
            text = held.read()
            if text:
                sys.stderr.buffer.write(text) if hasattr(sys.stderr, "buffer") else sys.stderr.write(text.decode())
                sys.stderr.flush()
        held.close()
    if panic is not None:
        pre = json.loads(backend.to_str()).get("pre_tokenizer")
        raise ValueError(f"the tokenizer failed on a text ({str(panic).splitlines()[0]}); its pre-tokenizer "
                         f"{json.dumps(pre)[:200]} cannot encode every input: use a tokenizer.json whose "
                         "regex does not give up (lldiff trains one when data.init_args.tokenizer_path is unset)")


def check_vocab_size(vocab_size: int) -> None:
    """Raise a clear error if ``vocab_size`` cannot hold the byte alphabet and special tokens."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"real tokens ({BYTE_ALPHABET_SIZE} byte symbols + eos, bos, pad; <|mask|> comes on top)"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: Optional[int] = None) -> Tokenizer:
    """Train a byte-level BPE with exactly ``vocab_size`` real ids plus ``<|mask|>`` as the last id.

    The model then has ``V = vocab_size`` real tokens and mask id ``M = V``. Raises ``ValueError`` if
    ``vocab_size`` is below :data:`MIN_VOCAB_SIZE` or if the texts are too small to learn that
    many merges. Deterministic for identical inputs.
    """
    check_vocab_size(vocab_size)
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,  # the mask token is appended after training
        special_tokens=[EOS, BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    learned = backend.get_vocab_size(with_added_tokens=True)
    if learned != vocab_size:
        raise ValueError(
            f"training text is too small to learn vocab_size={vocab_size}: BPE ran out of merges at "
            f"{learned} ids; use a smaller vocab_size (at most {learned}) or more text"
        )
    backend.add_special_tokens([MASK])
    return Tokenizer(backend, origin="trained tokenizer")
