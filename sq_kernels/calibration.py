"""Calibration: the per-channel absolute maximum of every target module's input.

``collect_act_stats(model, data)`` runs the model on calibration samples with a running abs-max
observer on the input of every ``nn.Linear``, every module a smoothing table names (MoE routers) and
every fused MoE experts module (whose per-expert ``down_proj`` inputs are observed too). Memory is
O(features) per module, not O(tokens). The statistics are what smoothing needs (``max|X_j|``) and what
the static scheme needs: a per-tensor maximum is the maximum of the per-channel ones, and after
smoothing ``max|X_j / s_j|`` follows from them exactly (``ActStats.scaled``).

Data: a tensor or numpy array of token ids (``[T]`` cut into ``seq_len`` chunks, or ``[B, T]`` rows), a
tokenizer's output (``{"input_ids": ...}``, e.g. a ``BatchEncoding``: one text is cut into ``seq_len`` chunks
like ``[T]``, several are rows; padding is dropped using its ``attention_mask``), a list of token tensors /
arrays (a ``[B, T]`` one gives ``B`` samples) / id lists / such dicts / strings / records ``{"text": str}``
(text needs a tokenizer), any other iterable of those (a generator, a ``datasets.Dataset``: read only up to
``num_samples``), or the path of a local ``.txt`` file (tokenized and cut into ``seq_len`` chunks; only its
start is read, in pieces cut at newlines, until ``num_samples * seq_len`` tokens), ``.jsonl`` file (one sample
per line, a string or an object with a string field ``"text"``) or ``.json`` file (an array of such values);
files are UTF-8, a byte-order mark is dropped. Every form obeys ``num_samples`` / ``seq_len`` / ``batch_size``.
Empty and whitespace-only texts are skipped; a file with no other text, bool / float ids and empty token
tensors are a ValueError. Samples are taken in order (deterministic); samples of equal length are batched,
nothing is padded. When a text file or a 1-D token stream gives fewer than ``num_samples`` full ``seq_len``
samples, or a JSON(L) file fewer than ``num_samples`` texts, a ``UserWarning`` says how much was obtained
(``ActStats.meta`` records ``num_samples`` and ``num_tokens``).
"""
from __future__ import annotations

import codecs
import contextlib
import io
import itertools
import json
import numbers
import operator
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .nn.experts import experts_forward_float, fused_experts_problem

STATS_FORMAT = "sq_kernels.act_stats"
STATS_VERSION = 1
DOWN_SUFFIX = "::down_proj"  # key of a fused experts module's per-expert down_proj input maxima [E, I]


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


class MissingStatsError(KeyError, ValueError):
    """Statistics for a module are missing (a ValueError too, with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ActStats:
    """Per-module input statistics: ``absmax[name]`` float32 ``[K]`` (``max_t |x[t, k]|``), for fused
    experts also ``absmax[name + "::down_proj"]`` ``[E, I]``; ``tokens[name]`` how many rows were seen.

    Every tensor is checked on construction: float32, finite, non-negative.
    """

    def __init__(self, absmax: dict[str, torch.Tensor], tokens: dict[str, int] | None = None, meta: dict | None = None):
        if not absmax:
            raise ValueError("ActStats: no statistics (did the calibration run reach any target module?)")
        bad = []
        self.absmax: dict[str, torch.Tensor] = {}
        for name, t in absmax.items():
            if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or not t.is_floating_point():
                raise ValueError(f"ActStats[{name!r}] must be a 1-D or 2-D float tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
            if not torch.isfinite(t).all():
                bad.append(name)
            elif (t < 0).any():
                raise ValueError(f"ActStats[{name!r}] holds negative absolute maxima: not abs-max statistics")
            self.absmax[name] = t
        if bad:
            raise ValueError(f"non-finite activation statistics (NaN/Inf) for {len(bad)} module(s): {bad[:8]}. "
                             "The model overflowed on the calibration data (run calibration in float32 or "
                             "bfloat16) or the statistics file is corrupt; refusing to smooth or quantize with them.")
        self.tokens = {k: int(v) for k, v in (tokens or {}).items()}
        self.meta = dict(meta or {})

    def __contains__(self, name: str) -> bool:
        return name in self.absmax

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.absmax[name]
        except KeyError:
            raise MissingStatsError(f"no calibration statistics for module {name!r} (statistics hold "
                                    f"{len(self.absmax)} modules, e.g. {sorted(self.absmax)[:3]}); were they "
                                    f"collected on this model?") from None

    def __len__(self) -> int:
        return len(self.absmax)

    def names(self) -> list[str]:
        return sorted(self.absmax)

    def per_tensor_absmax(self, name: str) -> torch.Tensor:
        """float32 scalar: the input's absolute maximum over all tokens and channels (static scales)."""
        return self[name].amax()

    def expert_down_absmax(self, name: str) -> torch.Tensor:
        """float32 ``[E]``: each expert's ``down_proj`` input maximum (static scales of fused experts)."""
        return self[name + DOWN_SUFFIX].amax(dim=-1)

    def scaled(self, divisors: dict[str, torch.Tensor], smoothing_id: str | None = None) -> "ActStats":
        """The statistics after smoothing: ``absmax[name] / s`` for each ``name`` in ``divisors``;
        ``smoothing_id``: the smoothing they describe (``smoothing_id(model)`` after it)."""
        out = dict(self.absmax)
        for name, s in divisors.items():
            out[name] = self[name] / s.detach().to(device="cpu", dtype=torch.float32)
        meta = {**self.meta, "smoothed": True}
        if smoothing_id is not None:
            meta["smoothing_id"] = smoothing_id
        return ActStats(out, self.tokens, meta)

    def save(self, path) -> None:
        """Write a safetensors file (tensors + metadata: format, version, token counts, meta)."""
        from safetensors.torch import save_file
        metadata = {"format": STATS_FORMAT, "version": str(STATS_VERSION), "tokens": json.dumps(self.tokens),
                    "meta": json.dumps(self.meta, default=str)}
        save_file({k: v.contiguous() for k, v in self.absmax.items()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path) -> "ActStats":
        """Read a file written by ``save``; a foreign, newer or corrupt file raises ValueError."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"statistics file {str(path)!r} " + ("is a directory, not a file" if path.is_dir()
                                                                  else "does not exist"))
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"{str(path)!r} is not a readable statistics file (corrupt or truncated?): "
                             f"{exc}") from None
        if metadata.get("format") != STATS_FORMAT:
            raise ValueError(f"{str(path)!r} is not an sq_kernels statistics file (format={metadata.get('format')!r})")
        if metadata.get("version") != str(STATS_VERSION):
            raise ValueError(f"{str(path)!r} has statistics format version {metadata.get('version')}; this sq_kernels "
                             f"reads version {STATS_VERSION}")
        try:
            tokens, meta = json.loads(metadata.get("tokens", "{}")), json.loads(metadata.get("meta", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r}: corrupt metadata ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(tokens, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in tokens.values()):
            raise ValueError(f"{str(path)!r}: corrupt metadata (expected a JSON object for 'meta' and one of token "
                             f"counts >= 0 for 'tokens', got {type(meta).__name__} and {str(tokens)[:80]})")
        return cls(tensors, tokens, meta)

    def __repr__(self) -> str:
        return f"ActStats({len(self.absmax)} modules, meta={self.meta})"


class RunningAbsMax:
    """Running ``max_t |x[t, k]|`` over the rows of every ``x [..., K]`` seen: O(K) memory."""

    def __init__(self):
        self.amax: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        cur = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float32)
        if self.amax is None:
            self.amax = cur
        elif self.amax.shape != cur.shape:
            raise ValueError(f"observer: input width changed from {self.amax.shape[0]} to {cur.shape[0]}")
        else:
            torch.maximum(self.amax, cur, out=self.amax)
        self.tokens += x.numel() // x.shape[-1]


class ExpertDownAbsMax:
    """Per-expert running abs-max of fused experts' ``down_proj`` inputs: ``[E, I]``."""

    def __init__(self, num_experts: int, width: int, device):
        self.amax = torch.zeros(num_experts, width, dtype=torch.float32, device=device)
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)

    def update(self, e: int, h: torch.Tensor) -> None:
        if h.numel():
            if self.amax.device != h.device:  # experts run on another device (layer-by-layer calibration)
                self.amax = self.amax.to(h.device)
            torch.maximum(self.amax[e], h.detach().abs().amax(dim=0).to(torch.float32), out=self.amax[e])
            self.tokens[e] += h.shape[0]


# ----------------------------------------------------------------------------------------------- data


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming the parameter (and its CLI flag) when it is not an integer
    ``>= minimum``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        value = None  # True is an int to Python, never a count to a user
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} ({flag}) must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} ({flag}) must be an integer >= {minimum}, got {number}")
    return number


def _is_hf_tokenizer(tokenizer) -> bool:
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedTokenizerBase", None) if transformers is not None else None
    return base is not None and isinstance(tokenizer, base)


def _encode(tokenizer, text: str, special_tokens: bool = True) -> torch.Tensor:
    """Token ids of ``text``; ``special_tokens=False`` asks an HF tokenizer not to add BOS / EOS (a piece of a
    text file after the first)."""
    if tokenizer is None:
        raise ValueError("data holds text but no tokenizer was given (pass tokenizer=, an HF tokenizer or any "
                         "callable str -> token ids)")
    if _is_hf_tokenizer(tokenizer):
        # verbose=False: a whole text file is longer than model_max_length by design (it is cut into seq_len
        # chunks afterwards); the ids are the same, only transformers' "indexing errors" warning is skipped.
        out = tokenizer(text, verbose=False) if special_tokens else \
            tokenizer(text, verbose=False, add_special_tokens=False)
    else:
        out = tokenizer(text)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    ids = torch.as_tensor(out, dtype=torch.long).reshape(-1)
    return ids


def _is_numpy_array(obj) -> bool:
    numpy = sys.modules.get("numpy")  # never imported here: an array can only exist if numpy is loaded
    return numpy is not None and isinstance(obj, numpy.ndarray)


def _is_id_list(obj) -> bool:
    """A list / tuple of integers (Python or numpy; not bools): one sample's token ids."""
    return isinstance(obj, (list, tuple)) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                  for v in obj)


def _token_tensor(obj, what: str) -> torch.Tensor:
    """``obj`` (a tensor, a numpy array or a list of ints) as an integer tensor of token ids, or a ValueError
    naming ``what`` (bool, float and complex values are not token ids)."""
    if isinstance(obj, (list, tuple)) and not obj:
        return torch.zeros(0, dtype=torch.long)  # torch.as_tensor([]) would be float32
    try:
        ids = torch.as_tensor(obj)
    except (TypeError, ValueError, RuntimeError):
        dtype = f" of dtype {obj.dtype}" if hasattr(obj, "dtype") else ""
        raise ValueError(f"{what}: expected integer token ids, got a {type(obj).__name__}{dtype}") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be integers, got {ids.dtype}")
    return ids


def _record_text(record, field: str):
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return record[field]
    return None


TEXT_BLOCK_BYTES = 1 << 18  # a text file is read in blocks of this many bytes


def _text_blocks(path, block_bytes: int | None = None):
    """The text of a local file, in blocks read one at a time: UTF-8, a leading byte-order mark dropped (as
    ``utf-8-sig`` reads it), newlines translated as ``Path.read_text`` does ("\\r\\n" and "\\r" to "\\n"). A file
    that is not UTF-8 text is a ValueError naming it and the first byte that cannot be decoded."""
    block_bytes = block_bytes or TEXT_BLOCK_BYTES
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    offset = 0  # bytes of the file before ``raw``
    with open(path, "rb") as f:
        raw = f.read(max(block_bytes, len(codecs.BOM_UTF8)))
        if raw.startswith(codecs.BOM_UTF8):
            raw, offset = raw[len(codecs.BOM_UTF8):] or f.read(block_bytes), len(codecs.BOM_UTF8)
        while True:
            pending = len(utf8.getstate()[0])  # bytes of a character split by the previous block
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} is not UTF-8 text (byte {offset - pending + exc.start} cannot be "
                                 f"decoded): give a UTF-8 .txt, .jsonl or .json file") from None
            if text:
                yield text
            if not raw:
                return
            offset += len(raw)
            raw = f.read(block_bytes)


def read_text_file(path) -> str:
    """A local text file's content (UTF-8; a leading byte-order mark is dropped); a file that is not UTF-8
    text is a ValueError naming it."""
    return "".join(_text_blocks(path))


# A .txt file is tokenized in pieces until num_samples * seq_len tokens are collected: the first piece holds at
# least FIRST_PIECE_CHARS characters (and TOKEN_CHARS per token needed), later ones are sized from the characters
# per token seen so far; none more than MAX_PIECE_CHARS (the tokenizer's memory). A file shorter than the first
# piece is tokenized whole, as one text.
FIRST_PIECE_CHARS = 1 << 16
TOKEN_CHARS = 8
MAX_PIECE_CHARS = 1 << 22
_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")


def _cut(text: str, size: int) -> int:
    """Where to end a piece taken from the start of ``text`` (longer than ``size``): after the last newline
    of its first ``size`` characters, else after their last whitespace, else at ``size`` (no whitespace)."""
    end = text.rfind("\n", 0, size) + 1
    if end:
        return end
    space = _LAST_SPACE.search(text, 0, size)
    return space.end() if space else size


def _text_file_tokens(path: Path, tokenizer, needed: int) -> torch.Tensor:
    """The token ids of the start of text file ``path``, at least ``needed`` of them (or the whole file).

    The file is read and tokenized in pieces cut after a newline (or other whitespace), so that a multi-GB
    file costs only the text the samples need. The first piece is tokenized as a whole text (with the
    tokenizer's BOS, if it adds one), later pieces without special tokens; a file that fits in the first
    piece gives exactly the ids of tokenizing it whole. A file without non-whitespace text is a ValueError."""
    blocks = _text_blocks(path)
    pieces: list[torch.Tensor] = []
    size = min(MAX_PIECE_CHARS, max(FIRST_PIECE_CHARS, TOKEN_CHARS * needed))
    pending, chars, tokens, has_text = "", 0, 0, False
    try:
        block = next(blocks, None)
        while block is not None:
            pending += block
            block = next(blocks, None)  # read ahead: the last block's text is tokenized whole, never cut
            while pending and (block is None or len(pending) >= size) and tokens < needed:
                end = len(pending) if block is None else _cut(pending, size)
                piece, pending = pending[:end], pending[end:]
                has_text = has_text or not piece.isspace()
                ids = _encode(tokenizer, piece, special_tokens=not pieces)
                pieces.append(ids)
                chars, tokens = chars + len(piece), tokens + ids.numel()
                per_token = chars / max(tokens, 1)  # sizes the next piece to what is still needed
                size = min(MAX_PIECE_CHARS, max(FIRST_PIECE_CHARS, int(1.25 * per_token * (needed - tokens))))
            if tokens >= needed:
                break
        if not has_text:  # enough tokens of whitespace: is there text further on?
            has_text = any(b and not b.isspace() for b in itertools.chain([pending, block or ""], blocks))
    finally:
        blocks.close()
    if not has_text:
        raise ValueError(f"data: {str(path)!r} holds no text (the file is empty or holds only whitespace)")
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    texts = []
    # split on "\n" only, as iterating over the file would: a JSON string may hold U+2028 and similar
    for lineno, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); a .jsonl file holds one string or "
                             f"object with a string field {field!r} per line") from None
        text = _record_text(record, field)
        if text is None:
            raise ValueError(f"{path}:{lineno}: expected a string or an object with a string field {field!r}"
                             f"{_field_hint(record, field)}")
        texts.append(text)
    return texts


def _field_hint(record, field: str) -> str:
    """What an object without a string ``field`` holds instead, and how to choose another field."""
    if not isinstance(record, dict):
        return f", got a JSON {type(record).__name__}"
    strings = [k for k, v in record.items() if isinstance(v, str)]
    held = f"its string fields are {strings}" if strings else f"it has no string field (keys: {list(record)[:8]})"
    return f"; {held}: choose the field with read_texts(path, field=...) or the CLI's --text-field"


def _read_json(path: Path, field: str = "text") -> list[str]:
    """A ``.json`` file: a JSON array of strings / ``{field: str}`` objects; JSON Lines content is read as such."""
    raw = read_text_file(path)
    accepted = (f"a .json file must hold a JSON array of strings or of objects with a string field {field!r} "
                f"(or JSON Lines: one such value per line)")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: JSON Lines saved as .json
            return _read_jsonl(path, field)
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {accepted}") from None
    if isinstance(document, list):
        texts = []
        for i, record in enumerate(document):
            text = _record_text(record, field)
            if text is None:
                raise ValueError(f"{path}: element [{i}] is a {type(record).__name__}, not a string or an object "
                                 f"with a string field {field!r}; "
                                 + (_field_hint(record, field).removeprefix("; ") if isinstance(record, dict)
                                    else accepted))
            texts.append(text)
        return texts
    text = _record_text(document, field)
    if text is not None:  # one record: one text
        return [text]
    hint = _field_hint(document, field) if isinstance(document, dict) else ""
    raise ValueError(f"{path}: holds a JSON {type(document).__name__}; {accepted}{hint}")


def read_texts(path, field: str = "text") -> list[str]:
    """The texts of a local ``.jsonl`` (one per line) or ``.json`` (an array) file: strings, or the string
    field ``field`` (default ``"text"``) of objects. The list can be passed as ``data`` anywhere a file can,
    e.g. ``collect_act_stats(model, read_texts("pile.jsonl", field="content"), tokenizer)``."""
    if not isinstance(field, str) or not field:
        raise ValueError(f"field must be a non-empty string (the JSON key holding each text), got {field!r}")
    path = Path(path)
    if not is_json_file(path):
        raise ValueError(f"{str(path)!r}: read_texts reads .jsonl / .json files; a text file is read as it is")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    return _read_json(path, field) if path.suffix.lower() == ".json" else _read_jsonl(path, field)


def is_json_file(path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json")


def _unpadded_rows(encoding: Mapping, what: str) -> list[torch.Tensor]:
    """The token rows of a tokenizer output ``{"input_ids": ..., "attention_mask": ...}``, padding removed."""
    try:
        ids = torch.as_tensor(encoding["input_ids"])
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what}['input_ids']: expected token ids (a tensor or a list of ints), or rows of equal "
                         f"length (tokenize with padding=True, or pass a list of encodings)") from None
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{what}['input_ids']: token ids must be integers, got {ids.dtype}")
    if ids.dim() > 2:
        raise ValueError(f"{what}['input_ids']: expected [T] or [B, T] token ids, got shape {tuple(ids.shape)}")
    rows = ids.long().reshape(-1, ids.shape[-1]) if ids.dim() else ids.long().reshape(1, 1)
    mask = encoding.get("attention_mask") if hasattr(encoding, "get") else None
    if mask is None:
        return list(rows)
    mask = torch.as_tensor(mask)
    if mask.numel() != rows.numel():
        raise ValueError(f"{what}: attention_mask of shape {tuple(mask.shape)} does not match input_ids of shape "
                         f"{tuple(ids.shape)}")
    mask = mask.reshape(rows.shape).bool()
    return [row[m] for row, m in zip(rows, mask)]


def _chunks(ids: torch.Tensor, seq_len: int, num_samples: int) -> list[torch.Tensor]:
    """Consecutive ``seq_len``-token chunks (at most ``num_samples``; a stream shorter than ``seq_len`` gives
    one short chunk; a remainder shorter than ``seq_len`` is dropped otherwise)."""
    n = min(num_samples, max(1, ids.numel() // seq_len))
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n) if ids[i * seq_len:(i + 1) * seq_len].numel()]


# What the "little data" warning says, by what the samples are for (calibration_samples' ``use``).
DATA_USES = {
    "calibration": ("calibration data", "--num-samples / --seq-len",
                    "Statistics from less data may miss activation outliers: give more calibration text"),
    "sqnr": ("the per-layer SQNR's data", "--sqnr-samples / --seq-len",
             "The SQNR is then measured on fewer tokens: give more text"),
}


def _warn_little_data(samples: list[torch.Tensor], num_samples: int, seq_len: int, source: str,
                      per_text: bool = False, use: str = "calibration") -> None:
    """Warn when ``samples`` hold fewer samples than asked for, or (for a cut stream) shorter ones."""
    got, tokens = len(samples), sum(int(s.numel()) for s in samples)
    short = not per_text and any(s.numel() < seq_len for s in samples)
    if not samples or (got >= num_samples and not short):
        return
    if per_text:
        obtained = f"{got} sample{'s' if got != 1 else ''} ({tokens} tokens in all, one per text)"
    else:
        lengths = sorted({int(s.numel()) for s in samples})
        size = " or ".join(str(n) for n in lengths)
        obtained = f"{got} sample{'s' if got != 1 else ''} x {size} tokens ({tokens} tokens in all)"
    what, flags, consequence = DATA_USES[use]
    warnings.warn(f"{what} {source} gave {obtained}; asked for num_samples={num_samples} x seq_len={seq_len} "
                  f"({flags}). {consequence}, or lower num_samples / seq_len to silence this warning",
                  UserWarning, stacklevel=3)


def _is_record_iterable(data) -> bool:
    """An iterable of samples other than a list / tuple: a generator, a ``datasets.Dataset`` (rows are
    dicts), any other iterable that is not itself a string, tensor, mapping or path."""
    return (hasattr(data, "__iter__") and not isinstance(data, (str, bytes, os.PathLike, Mapping, torch.Tensor)))


def _is_blank(text: str) -> bool:
    """An empty or whitespace-only text: no calibration text (skipped like an empty one)."""
    return not text or text.isspace()


def calibration_samples(data, tokenizer=None, num_samples: int = 128, seq_len: int = 512, *,
                        use: str = "calibration") -> list[torch.Tensor]:
    """Normalise ``data`` (see the module docstring) into at most ``num_samples`` 1-D LongTensors of at
    most ``seq_len`` tokens each. Warns (``UserWarning``) when a text file or a 1-D token stream gives fewer
    than ``num_samples`` samples of ``seq_len`` tokens, or a JSON(L) file fewer than ``num_samples`` texts.
    Empty and whitespace-only texts are skipped; a file without any other text, and an empty token tensor,
    are a ValueError. ``use`` ("calibration", "sqnr") words the warning for what the samples feed."""
    if use not in DATA_USES:
        raise ValueError(f"use must be one of {sorted(DATA_USES)}, got {use!r}")
    num_samples = check_positive_int("num_samples", num_samples)
    seq_len = check_positive_int("seq_len", seq_len)
    source = None  # set for data whose sample count the user does not choose directly (files, streams)
    per_text = False
    path = None
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data: {str(path)!r} is not a file (pass token tensors, a list of strings with a "
                             f"tokenizer, or the path of a local .txt / .jsonl / .json file)")
        source = f"from {str(path)!r}"
        if is_json_file(path):
            data, per_text = read_texts(path), True
            if all(_is_blank(text) for text in data):
                held = (f"its {len(data)} text{'s are' if len(data) != 1 else ' is'} empty or whitespace only"
                        if data else "no records")
                raise ValueError(f"data: {str(path)!r} holds no text ({held})")
        else:
            samples = _chunks(_text_file_tokens(path, tokenizer, num_samples * seq_len), seq_len, num_samples)
            if not samples:
                raise ValueError(f"data: {str(path)!r} holds no tokens (the tokenizer gave none for its text)")
            _warn_little_data(samples, num_samples, seq_len, source, use=use)
            return samples
    if _is_numpy_array(data):
        data = _token_tensor(data, "data")
    if isinstance(data, Mapping):  # a tokenizer's output (BatchEncoding is a Mapping)
        if "input_ids" not in data:
            raise ValueError(f"data: a dict (tokenizer output) must hold 'input_ids', got keys {list(data.keys())}")
        data = _unpadded_rows(data, "data")
        if len(data) == 1:  # one tokenized text: a stream, cut into seq_len chunks like a .txt file
            data, source = data[0], "(one tokenized text)"
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            raise ValueError(f"data: token ids must be an integer tensor, got {data.dtype}")
        if data.dim() not in (1, 2):
            raise ValueError(f"data: a token tensor must be [T] or [B, T], got shape {tuple(data.shape)}")
        if data.numel() == 0 and source is None:
            raise ValueError(f"data: the token tensor is empty (shape {tuple(data.shape)}): no tokens to calibrate on")
        if data.dim() == 1:
            samples = _chunks(data.long(), seq_len, num_samples)
            source = source or "(a 1-D token stream)"
        else:
            samples = [row[:seq_len].long() for row in data[:num_samples]]
    elif isinstance(data, (list, tuple)) or _is_record_iterable(data):
        samples = []
        for i, item in enumerate(data):  # a generator or a datasets.Dataset is read only as far as needed
            if len(samples) >= num_samples:
                break
            if isinstance(item, str) or (isinstance(item, Mapping) and "input_ids" not in item
                                         and isinstance(item.get("text"), str)):
                text = item if isinstance(item, str) else item["text"]  # a record {"text": ...}, as a datasets row
                source, per_text = source or "(the given texts)", True
                if _is_blank(text):
                    continue  # no text to calibrate on, like an empty one
                rows = [_encode(tokenizer, text)]
            elif isinstance(item, Mapping):
                if "input_ids" not in item:
                    raise ValueError(f"data[{i}]: a dict must hold 'input_ids' (a tokenizer's output) or a string "
                                     f"'text' (a record), got keys {list(item.keys())}; for another text field "
                                     f"pass [r[field] for r in records]")
                rows = _unpadded_rows(item, f"data[{i}]")
            elif isinstance(item, torch.Tensor) or _is_numpy_array(item) or _is_id_list(item):
                ids = _token_tensor(item, f"data[{i}]")
                if ids.dim() > 2:
                    raise ValueError(f"data[{i}]: a token tensor must be [T] or [B, T], got shape {tuple(ids.shape)}")
                if ids.numel() == 0:
                    raise ValueError(f"data[{i}]: empty token ids (shape {tuple(ids.shape)}): no tokens to "
                                     f"calibrate on")
                rows = list(ids.long().reshape(1, -1) if ids.dim() <= 1 else ids.long())  # [B, T]: B samples
            else:
                raise ValueError(f"data[{i}]: expected a string, a token tensor or numpy array, a list of ints or a "
                                 f"dict with 'input_ids' (e.g. a tokenizer's BatchEncoding), got "
                                 f"{_describe_item(item)}")
            for row in rows:
                if len(samples) < num_samples and row.numel() > 0:
                    samples.append(row.long()[:seq_len])
    else:
        raise ValueError(f"data: unsupported type {type(data).__name__} (pass token tensors, a tokenizer's output, "
                         f"a list of strings with a tokenizer, or the path of a local .txt / .jsonl / .json file)")
    samples = [s for s in samples if s.numel() > 0]
    if not samples:
        raise ValueError(f"data: {str(path)!r} gave no calibration samples" if path is not None else
                         "data: no calibration samples (empty data, or only empty / whitespace-only texts)")
    if source is not None:
        _warn_little_data(samples, num_samples, seq_len, source, per_text=per_text, use=use)
    return samples


def _describe_item(item) -> str:
    """The type of a data item that is not a sample, with the offending element of a list."""
    if isinstance(item, (list, tuple)):
        odd = next((v for v in item if not isinstance(v, numbers.Integral) or isinstance(v, bool)), None)
        if odd is not None:
            return (f"a {type(item).__name__} holding a {type(odd).__name__} ({odd!r}); token ids are integers, "
                    f"texts are strings")
    return type(item).__name__


class _Batches(list):
    """What ``calibration_batches`` returns: ``[b, T]`` batches already limited to num_samples / seq_len /
    batch_size. Given as data again (``smoothquant`` hands its batches to ``collect_act_stats`` and
    ``smooth_``), it is used as it is; any other list of ``[B, T]`` tensors is cut like other data."""


def calibration_batches(data, tokenizer=None, num_samples: int = 128, seq_len: int = 512,
                        batch_size: int = 1, *, use: str = "calibration") -> list[torch.Tensor]:
    """``calibration_samples`` grouped into ``[b, T]`` batches of consecutive equal-length samples. A list of
    ``[B, T]`` token tensors gives its rows as samples (at most ``num_samples``, cut to ``seq_len``, regrouped
    by ``batch_size``); only this function's own result is passed on unchanged."""
    check_positive_int("num_samples", num_samples)
    check_positive_int("seq_len", seq_len)
    batch_size = check_positive_int("batch_size", batch_size)
    if isinstance(data, _Batches):
        return data
    samples = calibration_samples(data, tokenizer, num_samples, seq_len, use=use)
    batches, current = [], []
    for s in samples:
        if current and (len(current) == batch_size or current[0].numel() != s.numel()):
            batches.append(torch.stack(current))
            current = []
        current.append(s)
    if current:
        batches.append(torch.stack(current))
    batches = _Batches(batches)
    full = -(-len(samples) // batch_size)
    if batch_size > 1 and len(batches) > max(2 * full, full + 1):
        warnings.warn(f"batch_size={batch_size}: only consecutive samples of equal length are batched (nothing is "
                      f"padded), so {len(samples)} samples made {len(batches)} batches. For full batches use texts "
                      f"of at least seq_len={seq_len} tokens (longer ones are cut) or a .txt file (cut into "
                      f"seq_len chunks)", UserWarning, stacklevel=2)
    return batches


# Config fields that name a model's maximum number of positions, in the order families use them.
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
# Names of learned absolute-position tables (OPT / BioGPT: embed_positions, GPT-2 / GPT-Neo: wpe, ...).
_POSITION_TABLES = ("embed_positions", "wpe", "position_embeddings", "pos_emb", "embed_pos")


def position_limit(model) -> tuple[int, str, bool] | None:
    """``(limit, what, hard)``: the most tokens one sequence may have. ``hard`` when the model looks positions
    up in a learned table (longer inputs index past it: OPT, GPT-2); otherwise ``limit`` is the config's
    trained context (rotary / ALiBi models run beyond it). None when the model states no limit."""
    config = getattr(model, "config", None)
    field, value = None, None
    for name in POSITION_FIELDS:
        v = getattr(config, name, None) if config is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            field, value = name, v
            break
    for name, module in model.named_modules() if isinstance(model, nn.Module) else ():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            # OPT's table has max_position_embeddings + 2 rows: position p is looked up at row p + offset
            limit = module.num_embeddings - int(getattr(module, "offset", 0) or 0)
            if value is not None and limit == value:
                return limit, f"{field} ({limit})", True
            return limit, f"learned position table {name} ({limit} positions)", True
    if value is None:
        return None
    return value, f"{field} ({value})", False


def check_positions(model, length: int, what: str = "seq_len", remedy: str | None = None,
                    warn: bool = True) -> bool:
    """ValueError when sequences of ``length`` tokens exceed the positions ``model`` can embed (a learned
    table: OPT, GPT-2); a UserWarning (when ``warn``) when they only exceed its trained context (rotary /
    ALiBi models run beyond it). ``remedy`` ends the message (default: lower seq_len). True when over a
    soft limit."""
    found = position_limit(model)
    if found is None or length <= found[0]:
        return False
    limit, described, hard = found
    remedy = remedy or f"pass seq_len <= {limit} (--seq-len {limit})"
    if hard:
        raise ValueError(f"{what}: sequences of {length} tokens exceed the model's {described}: it has learned "
                         f"position embeddings for at most {limit} tokens; {remedy}")
    if warn:
        warnings.warn(f"{what}: sequences of {length} tokens are longer than the model's {described}, the context "
                      f"it was trained for; results beyond it may be poor ({remedy})", UserWarning, stacklevel=3)
    return True


def check_token_ids(model, batch: torch.Tensor, positions: bool = True) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if batch.numel() and vocab is not None and (int(batch.min()) < 0 or int(batch.max()) >= vocab):
        raise ValueError(f"data: token ids must lie in [0, {vocab}) (the model's vocab_size), got "
                         f"[{int(batch.min())}, {int(batch.max())}]; was the data tokenized for another model?")
    if positions and batch.dim():
        check_positions(model, int(batch.shape[-1]), "seq_len")


def model_device(model) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Every module of ``models`` in eval mode (no dropout) inside the block; afterwards each module gets
    back its own ``training`` flag (a submodule the user froze in eval mode inside a model in training
    mode stays so, which ``model.train(was_training)`` would undo)."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def run_model(model, batch: torch.Tensor):
    """One forward of ``model`` on token ids ``batch [b, T]`` (no KV cache)."""
    if getattr(model, "config", None) is not None:
        return model(input_ids=batch, use_cache=False)
    return model(batch)


# ------------------------------------------------------------------------------------------- observers


def default_targets(model, family=None) -> dict[str, nn.Module]:
    """Modules whose input calibration observes: every ``nn.Linear``, every fused experts module, and the
    targets of the smoothing table (e.g. MoE routers)."""
    from .families import UnsupportedModelError, decoder_layers, family_of, get_submodule
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or _is_fused_experts(module):
            targets[name] = module
    try:
        spec = family_of(model, family)
    except UnsupportedModelError:
        spec = None
    if spec is not None:
        try:
            layers = decoder_layers(model, spec)
        except ValueError:
            layers = []
        config = getattr(model, "config", None)
        for lname, layer in layers:
            for group in spec.active_groups(config, fold_linear_pairs=True):
                if not group.present(layer):
                    continue
                for target in group.targets:
                    try:
                        targets[f"{lname}.{target}"] = get_submodule(layer, target)
                    except ValueError:
                        pass  # smooth_ reports a table that does not match the model
    return targets


def _is_fused_experts(module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3


def _first_tensor(args, kwargs):
    for v in list(args) + [kwargs.get("hidden_states"), kwargs.get("input")] + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


@torch.no_grad()
def collect_act_stats(model, data, tokenizer=None, *, num_samples: int = 128, seq_len: int = 512,
                      batch_size: int = 1, targets: dict[str, nn.Module] | None = None, family=None,
                      progress: bool = True, device=None) -> ActStats:
    """Run ``model`` on calibration ``data`` and return the per-channel input abs-max of each target module.

    Args:
        model: an HF causal LM (or any module taking token ids), on CPU or GPU; run in eval mode.
        data: token tensors, a tokenizer's output, a list of strings (with ``tokenizer``), or a local .txt /
            .jsonl / .json path (see the module docstring).
        tokenizer: an HF tokenizer or any callable ``str -> token ids``.
        num_samples / seq_len / batch_size: how much data, in samples of at most ``seq_len`` tokens (positive
            integers; ``seq_len`` at most the model's learned positions, e.g. OPT's max_position_embeddings).
        targets: ``{name: module}`` to observe (default: ``default_targets(model)``).
        family: a ``FamilySpec`` overriding the registered table (for the router targets).
        progress: tqdm progress bar.
        device: where to run (default: where the model is). When the model's weights are elsewhere (a model in
            CPU memory too large for the GPU, ``device="cuda"``), the decoder layers are run one at a time: each
            goes to ``device``, runs on every batch and comes back (``sq_kernels.layerwise``); the modules
            outside the layers (embeddings, final norm, head) stay on ``device`` meanwhile. The statistics
            are those of a whole-model run, and the model is left where it was.

    Returns:
        ``ActStats`` (``meta["num_samples"]`` / ``meta["num_tokens"]``: how much data was used); raises
        ValueError when a statistic is NaN/Inf (an overflowing model). Warns when the data gave fewer samples
        than asked for (see ``calibration_samples``).
    """
    if type(tokenizer).__name__ == "SmoothQuantConfig":
        raise ValueError("collect_act_stats: the third argument is the tokenizer, got a SmoothQuantConfig; pass "
                         "num_samples= / seq_len= / batch_size= by keyword (or use smoothquant(model, data, config))")
    batches = calibration_batches(data, tokenizer, num_samples, seq_len, batch_size)
    # every batch is checked before the (possibly long) calibration run starts
    for batch in batches:
        check_token_ids(model, batch, positions=False)
    if batches:
        check_positions(model, max(int(b.shape[-1]) for b in batches), "seq_len")
    targets = default_targets(model, family) if targets is None else targets
    if not targets:
        raise ValueError(f"collect_act_stats: {type(model).__name__} has no nn.Linear or experts module to observe")
    if not isinstance(progress, bool):
        raise ValueError(f"collect_act_stats: progress must be True or False, got {progress!r}")
    runner = _layerwise_runner(model, batches, device, family, "collect_act_stats")
    device = model_device(model) if runner is None else runner.device
    observers, down_observers, handles, patched = {}, {}, [], []  # patched: (module, its own instance forward)

    def make_hook(obs):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None:
                obs.update(x)
        return hook

    with eval_mode(model):
        try:
            if runner is not None:  # the layers' calls are recorded before any observer is attached
                runner.__enter__()
                runner.record()
            for name, module in targets.items():
                obs = observers[name] = RunningAbsMax()
                if fused_experts_problem(module) is None:
                    e, two_i, _ = module.gate_up_proj.shape
                    down = down_observers[name] = ExpertDownAbsMax(e, two_i // 2, module.gate_up_proj.device)

                    def forward(hidden_states, top_k_index, top_k_weights, _m=module, _obs=obs, _down=down):
                        _obs.update(hidden_states)
                        return experts_forward_float(_m, hidden_states, top_k_index, top_k_weights, _down.update)
                    patched.append((module, module.__dict__.get("forward")))  # e.g. an accelerate hook's: restored
                    module.forward = forward  # instance attribute: shadows the class forward during calibration
                else:
                    handles.append(module.register_forward_pre_hook(make_hook(obs), with_kwargs=True))
            if runner is None:
                for batch in _progress(batches, progress, desc="calibrating", unit="batch"):
                    run_model(model, batch.to(device))
            else:
                final = runner.walk(progress=progress, desc=f"calibrating layer by layer on {device}")
                inside = tuple(f"{name}." for name, _ in runner.layers)
                if any(not name.startswith(inside) for name in targets):  # e.g. lm_head
                    runner.tail(final)
        finally:
            for h in handles:
                h.remove()
            for module, forward in patched:
                if forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = forward
            if runner is not None:
                runner.__exit__()
    absmax, tokens = {}, {}
    for name, obs in observers.items():
        if obs.amax is not None:
            absmax[name], tokens[name] = obs.amax, obs.tokens
    for name, down in down_observers.items():
        absmax[name + DOWN_SUFFIX], tokens[name + DOWN_SUFFIX] = down.amax, int(down.tokens.sum())
    meta = {"model_type": getattr(getattr(model, "config", None), "model_type", None),
            "model_class": type(model).__name__, "num_batches": len(batches),
            "num_samples": sum(b.shape[0] for b in batches), "num_tokens": sum(b.numel() for b in batches),
            "seq_len": max((int(b.shape[-1]) for b in batches), default=0), "smoothed": is_smoothed(model)}
    sid = smoothing_id(model)
    if sid is not None:
        meta["smoothing_id"] = sid
    never = sorted(set(targets) - set(absmax))
    if never:
        meta["never_called"] = never
    return ActStats(absmax, tokens, meta)


def _layerwise_runner(model, batches, device, family, what: str):
    """A ``LayerwiseRun`` when ``device`` is not where the model's weights are, else None."""
    if device is None:
        return None
    from .checkpoint import check_device
    from .families import UnsupportedModelError, decoder_layers, family_of
    from .layerwise import LayerwiseRun
    target = check_device(device, "device")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target == model_device(model):
        return None
    check_in_memory(model, what)
    try:
        layers = decoder_layers(model, family_of(model, family))
    except (UnsupportedModelError, ValueError) as exc:
        raise ValueError(f"{what}: device={str(target)!r} is not where the model is ({model_device(model)}), so it "
                         f"would run one decoder layer at a time, which needs the model's decoder layers: {exc}. "
                         f"Move the model to {target} instead, or pass family=") from None
    return LayerwiseRun(model, layers, batches, target, run_model)


def check_stats_source(model, stats: "ActStats", what: str) -> None:
    """Warn when ``stats`` were collected on a model of another type than ``model`` (their shapes may still
    fit, e.g. Llama statistics on a Qwen2 model of the same size, and give silently poor scales), or hold
    modules ``model`` does not have (statistics of a deeper model: its first layers fit this one's shapes)."""
    recorded = stats.meta.get("model_type") if isinstance(getattr(stats, "meta", None), dict) else None
    actual = getattr(getattr(model, "config", None), "model_type", None)
    if recorded and actual and recorded != actual:
        warnings.warn(f"{what}: the statistics were collected on a {recorded!r} model and this is a {actual!r} "
                      f"model; statistics belong to the model they were collected on (collect them again)",
                      UserWarning, stacklevel=3)
    modules = {name for name, _ in model.named_modules()}
    foreign = [n for n in stats.names() if n.split(DOWN_SUFFIX)[0] not in modules]
    if foreign:
        warnings.warn(f"{what}: the statistics hold {len(foreign)} module(s) this model does not have (e.g. "
                      f"{foreign[:3]}): they were collected on another model; statistics belong to the model they "
                      f"were collected on (collect them again)", UserWarning, stacklevel=3)


def check_in_memory(model, what: str) -> None:
    """Every weight is in memory: a model loaded with disk / CPU offloading (``device_map``) keeps some on the
    meta device, which calibration runs through but smoothing and quantization cannot change."""
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(f"{what}: {len(on_meta)} weights of the model are on the meta device (e.g. {on_meta[0]!r}): "
                         f"it was loaded with offloading (device_map=... with 'disk' or 'cpu' offload). Load it "
                         f"entirely onto one device (device_map=None, or a single GPU) to smooth and quantize it")


def smoothing_id(model) -> str | None:
    """The identity of the last smoothing ``smooth_`` gave ``model`` (recorded in its config, so it survives
    ``save_pretrained`` / ``from_pretrained``), or None."""
    recorded = getattr(getattr(model, "config", None), "sq_smoothed", None)
    if not isinstance(recorded, dict):
        recorded = getattr(model, "sq_smoothing", None)
    value = recorded.get("id") if isinstance(recorded, dict) else None
    return value if isinstance(value, str) else None


def is_smoothed(model) -> bool:
    """Whether ``smooth_`` ran on ``model``: recorded on the model and in its config (``sq_smoothed``), so that
    it survives ``save_pretrained`` / ``from_pretrained``."""
    return bool(getattr(model, "sq_smoothing", None) or getattr(getattr(model, "config", None), "sq_smoothed", None))


def check_stats_match_smoothing(model, stats, what: str) -> None:
    """Statistics describe the activations of the model they were collected on: refuse them where they
    describe the model before or after a smoothing that it has not had (``stats.meta["smoothed"]``; absent
    in files saved before it was recorded, which are not judged)."""
    recorded = stats.meta.get("smoothed") if isinstance(getattr(stats, "meta", None), dict) else None
    if recorded is None:
        return
    smoothed = is_smoothed(model)
    if smoothed and recorded is False:
        raise ValueError(f"{what}: the model was smoothed, and these statistics were collected before that, on the "
                         f"original model: the activations they describe are gone (smoothing again would scale the "
                         f"same channels twice; static scales would miss the smoothing factors). Use the statistics "
                         f"after smoothing (the SmoothReport's .stats), or collect statistics on the smoothed model")
    if not smoothed and recorded is True:
        raise ValueError(f"{what}: these statistics describe a smoothed model (a SmoothReport's .stats, or collected "
                         f"after smoothing), and this model has not been smoothed: collect statistics on this model")
    stats_id, model_id = stats.meta.get("smoothing_id"), smoothing_id(model)
    if smoothed and recorded is True and stats_id and model_id and stats_id != model_id:
        raise ValueError(f"{what}: these statistics describe another smoothing (smoothing {stats_id}) than the one "
                         f"this model has had (smoothing {model_id}): another copy of the model, or this one before "
                         f"it was smoothed again. Their channels are scaled differently; use the .stats of the "
                         f"SmoothReport that smoothed this model, or collect statistics on it")
