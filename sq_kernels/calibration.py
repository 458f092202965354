"""Calibration: the per-channel absolute maximum of every target module's input.

``collect_act_stats(model, data)`` runs the model on calibration samples with a running abs-max
observer on the input of every ``nn.Linear``, every module a smoothing table names (MoE routers) and
every fused MoE experts module (whose per-expert ``down_proj`` inputs are observed too). Memory is
O(features) per module, not O(tokens). The statistics are what smoothing needs (``max|X_j|``) and what
the static scheme needs: a per-tensor maximum is the maximum of the per-channel ones, and after
smoothing ``max|X_j / s_j|`` follows from them exactly (``ActStats.scaled``).

Data: a tensor of token ids (``[T]`` cut into ``seq_len`` chunks, or ``[B, T]`` rows), a list of token
tensors / id lists / strings (strings need a tokenizer), or the path of a local ``.txt`` file (tokenized
and cut into ``seq_len`` chunks) or ``.jsonl`` file (one sample per line, field ``"text"``). Samples are
taken in order (deterministic); samples of equal length are batched, nothing is padded.
"""
from __future__ import annotations

import json
import os
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

    def scaled(self, divisors: dict[str, torch.Tensor]) -> "ActStats":
        """The statistics after smoothing: ``absmax[name] / s`` for each ``name`` in ``divisors``."""
        out = dict(self.absmax)
        for name, s in divisors.items():
            out[name] = self[name] / s.detach().to(device="cpu", dtype=torch.float32)
        return ActStats(out, self.tokens, self.meta)

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
            raise ValueError(f"statistics file {str(path)!r} does not exist")
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
            torch.maximum(self.amax[e], h.detach().abs().amax(dim=0).to(torch.float32), out=self.amax[e])
            self.tokens[e] += h.shape[0]


# ----------------------------------------------------------------------------------------------- data


def _encode(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("data holds text but no tokenizer was given (pass tokenizer=, an HF tokenizer or any "
                         "callable str -> token ids)")
    out = tokenizer(text)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    ids = torch.as_tensor(out, dtype=torch.long).reshape(-1)
    return ids


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if isinstance(record, str):
                texts.append(record)
            elif isinstance(record, dict) and isinstance(record.get(field), str):
                texts.append(record[field])
            else:
                raise ValueError(f"{path}:{lineno}: expected an object with a string field {field!r}")
    return texts


def _chunks(ids: torch.Tensor, seq_len: int, num_samples: int) -> list[torch.Tensor]:
    n = min(num_samples, max(1, ids.numel() // seq_len))
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n) if ids[i * seq_len:(i + 1) * seq_len].numel()]


def calibration_samples(data, tokenizer=None, num_samples: int = 128, seq_len: int = 512) -> list[torch.Tensor]:
    """Normalise ``data`` (see the module docstring) into at most ``num_samples`` 1-D LongTensors of at
    most ``seq_len`` tokens each."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data: {str(path)!r} is not a file (pass token tensors, a list of strings with a "
                             f"tokenizer, or the path of a local .txt / .jsonl file)")
        if path.suffix.lower() in (".jsonl", ".json"):
            data = _read_jsonl(path)
        else:
            samples = _chunks(_encode(tokenizer, path.read_text(encoding="utf-8")), seq_len, num_samples)
            if not samples:
                raise ValueError(f"data: {str(path)!r} holds no tokens")
            return samples
    if isinstance(data, torch.Tensor):
        if data.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise ValueError(f"data: token ids must be an integer tensor, got {data.dtype}")
        if data.dim() == 1:
            samples = _chunks(data.long(), seq_len, num_samples)
        elif data.dim() == 2:
            samples = [row[:seq_len].long() for row in data[:num_samples]]
        else:
            raise ValueError(f"data: a token tensor must be [T] or [B, T], got shape {tuple(data.shape)}")
    elif isinstance(data, (list, tuple)):
        samples = []
        for i, item in enumerate(data):
            if len(samples) >= num_samples:
                break
            if isinstance(item, str):
                ids = _encode(tokenizer, item)
            elif isinstance(item, dict) and "input_ids" in item:
                ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
            elif isinstance(item, torch.Tensor) or (isinstance(item, (list, tuple))
                                                    and all(isinstance(v, int) for v in item)):
                ids = torch.as_tensor(item)
                if ids.is_floating_point():
                    raise ValueError(f"data[{i}]: token ids must be integers, got {ids.dtype}")
            else:
                raise ValueError(f"data[{i}]: expected a string, a token tensor, a list of ints or a dict with "
                                 f"'input_ids', got {type(item).__name__}")
            ids = ids.long()
            for row in (ids.reshape(1, -1) if ids.dim() <= 1 else ids):
                if len(samples) < num_samples:
                    samples.append(row[:seq_len])
    else:
        raise ValueError(f"data: unsupported type {type(data).__name__} (pass token tensors, a list of strings "
                         f"with a tokenizer, or the path of a local .txt / .jsonl file)")
    samples = [s for s in samples if s.numel() > 0]
    if not samples:
        raise ValueError("data: no calibration samples (empty data or empty texts)")
    return samples


def calibration_batches(data, tokenizer=None, num_samples: int = 128, seq_len: int = 512,
                        batch_size: int = 1) -> list[torch.Tensor]:
    """``calibration_samples`` grouped into ``[b, T]`` batches of consecutive equal-length samples."""
    if isinstance(data, list) and data and all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in data) \
            and not any(b.is_floating_point() for b in data):
        return [b.long() for b in data]  # already batched
    samples = calibration_samples(data, tokenizer, num_samples, seq_len)
    batches, current = [], []
    for s in samples:
        if current and (len(current) == batch_size or current[0].numel() != s.numel()):
            batches.append(torch.stack(current))
            current = []
        current.append(s)
    if current:
        batches.append(torch.stack(current))
    return batches


def check_token_ids(model, batch: torch.Tensor) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if batch.numel() and vocab is not None and (int(batch.min()) < 0 or int(batch.max()) >= vocab):
        raise ValueError(f"data: token ids must lie in [0, {vocab}) (the model's vocab_size), got "
                         f"[{int(batch.min())}, {int(batch.max())}]; was the data tokenized for another model?")


def model_device(model) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


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
    spec = family
    if spec is None:
        try:
            spec = family_of(model)
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
                      progress: bool = True) -> ActStats:
    """Run ``model`` on calibration ``data`` and return the per-channel input abs-max of each target module.

    Args:
        model: an HF causal LM (or any module taking token ids), on CPU or GPU; run in eval mode.
        data: token tensors, a list of strings (with ``tokenizer``), or a local .txt / .jsonl path.
        tokenizer: an HF tokenizer or any callable ``str -> token ids``.
        num_samples / seq_len / batch_size: how much data, in samples of at most ``seq_len`` tokens.
        targets: ``{name: module}`` to observe (default: ``default_targets(model)``).
        family: a ``FamilySpec`` overriding the registered table (for the router targets).
        progress: tqdm progress bar.

    Returns:
        ``ActStats``; raises ValueError when a statistic is NaN/Inf (an overflowing model).
    """
    batches = calibration_batches(data, tokenizer, num_samples, seq_len, batch_size)
    targets = default_targets(model, family) if targets is None else targets
    if not targets:
        raise ValueError(f"collect_act_stats: {type(model).__name__} has no nn.Linear or experts module to observe")
    device = model_device(model)
    observers, down_observers, handles, patched = {}, {}, [], []

    def make_hook(obs):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None:
                obs.update(x)
        return hook

    for name, module in targets.items():
        obs = observers[name] = RunningAbsMax()
        if fused_experts_problem(module) is None:
            e, two_i, _ = module.gate_up_proj.shape
            down = down_observers[name] = ExpertDownAbsMax(e, two_i // 2, module.gate_up_proj.device)

            def forward(hidden_states, top_k_index, top_k_weights, _m=module, _obs=obs, _down=down):
                _obs.update(hidden_states)
                return experts_forward_float(_m, hidden_states, top_k_index, top_k_weights, _down.update)
            module.forward = forward  # instance attribute: shadows the class forward during calibration
            patched.append(module)
        else:
            handles.append(module.register_forward_pre_hook(make_hook(obs), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for batch in _progress(batches, progress, desc="calibrating", unit="batch"):
            check_token_ids(model, batch)
            run_model(model, batch.to(device))
    finally:
        for h in handles:
            h.remove()
        for module in patched:
            del module.forward
        model.train(was_training)
    absmax, tokens = {}, {}
    for name, obs in observers.items():
        if obs.amax is not None:
            absmax[name], tokens[name] = obs.amax, obs.tokens
    for name, down in down_observers.items():
        absmax[name + DOWN_SUFFIX], tokens[name + DOWN_SUFFIX] = down.amax, int(down.tokens.sum())
    meta = {"model_type": getattr(getattr(model, "config", None), "model_type", None),
            "model_class": type(model).__name__, "num_batches": len(batches),
            "num_samples": sum(b.shape[0] for b in batches), "num_tokens": sum(b.numel() for b in batches),
            "seq_len": seq_len}
    never = sorted(set(targets) - set(absmax))
    if never:
        meta["never_called"] = never
    return ActStats(absmax, tokens, meta)
