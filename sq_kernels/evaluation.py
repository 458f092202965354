"""Evaluation on local data: perplexity with sliding windows, LAMBADA-style last-word accuracy, and a
per-layer SQNR report of a quantized model against its floating-point original.

SQNR (signal-to-quantization-noise ratio) is ``20 log10(||ref|| / ||ref - test||)`` dB: 20 dB means an
error of 10 % of the signal's norm, 40 dB 1 %.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .calibration import _encode, _read_jsonl, calibration_batches, check_token_ids, model_device


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """``20 log10(||ref|| / ||ref - test||)`` in dB (``inf`` when equal)."""
    if ref.shape != test.shape:
        raise ValueError(f"sqnr: shapes differ, {tuple(ref.shape)} vs {tuple(test.shape)}")
    ref, test = ref.detach().double(), test.detach().double()
    err = (ref - test).norm()
    if err == 0:
        return math.inf
    return float(20.0 * torch.log10(ref.norm() / err))


def _progress(iterable, enabled, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


def _token_stream(data, tokenizer) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.is_floating_point():
            raise ValueError(f"data: token ids must be integers, got {data.dtype}")
        return data.reshape(-1).long()
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} is not a file (pass a local text file or a 1-D token tensor)")
    return _encode(tokenizer, path.read_text(encoding="utf-8"))


@torch.no_grad()
def perplexity(model: nn.Module, data, tokenizer=None, *, seq_len: int = 512, stride: int | None = None,
               max_windows: int | None = None, progress: bool = True) -> float:
    """Perplexity of ``model`` on a local text file (or a 1-D token tensor), with sliding windows.

    Windows of ``seq_len`` tokens start every ``stride`` tokens. A token is scored at most once, by the
    first window that can predict it (it needs one token of context inside the window). With the
    default ``stride = seq_len`` (disjoint windows, as in the SmoothQuant and GPTQ WikiText evaluations)
    the first token of every window is context only; with ``stride < seq_len`` every token but the
    text's first is scored, later windows giving ``seq_len - stride`` tokens of extra context.
    Returns ``exp(mean negative log-likelihood)``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must lie in [1, seq_len={seq_len}], got {stride}")
    ids = _token_stream(data, tokenizer)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    check_token_ids(model, ids)
    device = model_device(model)
    starts = list(range(0, ids.numel() - 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    nll, count, scored_to = 0.0, 0, 1
    for begin in _progress(starts, progress, desc="perplexity", unit="window"):
        end = min(begin + seq_len, ids.numel())
        lo = max(scored_to, begin + 1)
        if lo >= end:
            continue
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits[0].float()
        targets = ids[lo:end].to(device)
        logp = torch.log_softmax(logits[lo - 1 - begin:end - 1 - begin], dim=-1)
        nll -= float(logp.gather(-1, targets.unsqueeze(-1)).sum())
        count += targets.numel()
        scored_to = end
        if end == ids.numel():
            break
    return math.exp(nll / count)


def _encode_target(tokenizer, text: str) -> torch.Tensor:
    try:
        out = tokenizer(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer(text)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return torch.as_tensor(out, dtype=torch.long).reshape(-1)


@torch.no_grad()
def last_token_accuracy(model: nn.Module, data, tokenizer, *, max_samples: int | None = None,
                        progress: bool = True) -> float:
    """LAMBADA-style accuracy: the fraction of texts whose last word the model predicts exactly (every
    token of it, greedily) from the preceding context.

    ``data``: a local JSONL file (one ``{"text": ...}`` per line) or a list of strings.
    """
    texts = _read_jsonl(Path(data)) if isinstance(data, (str, Path)) else list(data)
    if max_samples is not None:
        texts = texts[:max_samples]
    if not texts:
        raise ValueError("last_token_accuracy: no texts")
    device = model_device(model)
    correct = 0
    for i, text in enumerate(_progress(texts, progress, desc="last-word accuracy", unit="text")):
        text = text.strip()
        cut = text.rfind(" ")
        if cut <= 0:
            raise ValueError(f"text {i} has no context before its last word: {text[:60]!r}")
        context = _encode(tokenizer, text[:cut])
        full = _encode(tokenizer, text)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and context.numel() and full.numel() and int(context[-1]) == int(full[-1]) == eos:
            context, full = context[:-1], full[:-1]  # a tokenizer that appends EOS: the target is the word
        if full.numel() > context.numel() and torch.equal(full[:context.numel()], context):
            target = full[context.numel():]
        else:  # the tokenizer merges across the cut: tokenize the last word on its own
            target = _encode_target(tokenizer, text[cut:])
        ids = torch.cat([context, target]).unsqueeze(0)
        check_token_ids(model, ids)
        logits = model(input_ids=ids.to(device), use_cache=False).logits[0]
        predicted = logits[context.numel() - 1:ids.shape[1] - 1].argmax(dim=-1).cpu()
        correct += bool(torch.equal(predicted, target))
    return correct / len(texts)


def _quantized_names(model: nn.Module) -> list[str]:
    from .nn import W8A8Experts, W8A8Linear
    return [n for n, m in model.named_modules() if isinstance(m, (W8A8Linear, W8A8Experts))]


@torch.no_grad()
def layer_sqnr(fp_model: nn.Module, q_model: nn.Module, data, tokenizer=None, *, num_samples: int = 8,
               seq_len: int = 128, progress: bool = True) -> dict[str, float]:
    """SQNR (dB) of every quantized module's output in ``q_model`` against the same-named module of
    ``fp_model`` on the same inputs (errors accumulate through the network, as in deployment), then of
    the logits (key ``"logits"``). Smoothing does not change a linear's output, so a smoothed model
    compares directly."""
    names = _quantized_names(q_model)
    if not names:
        raise ValueError("layer_sqnr: q_model has no W8A8 modules")
    fp_modules = dict(fp_model.named_modules())
    missing = [n for n in names if n not in fp_modules]
    if missing:
        raise ValueError(f"layer_sqnr: fp_model lacks modules {missing[:4]}: is it the original of q_model?")
    q_modules = dict(q_model.named_modules())
    batches = calibration_batches(data, tokenizer, num_samples, seq_len, 1)
    signal = {n: 0.0 for n in names + ["logits"]}
    noise = dict(signal)

    def capture(store, name):
        def hook(module, args, output):
            store[name] = (output[0] if isinstance(output, (tuple, list)) else output).detach()
        return hook

    fp_out, q_out, handles = {}, {}, []
    for n in names:
        handles.append(fp_modules[n].register_forward_hook(capture(fp_out, n)))
        handles.append(q_modules[n].register_forward_hook(capture(q_out, n)))
    try:
        for batch in _progress(batches, progress, desc="layer SQNR", unit="batch"):
            check_token_ids(fp_model, batch)
            fp_out["logits"] = fp_model(input_ids=batch.to(model_device(fp_model)), use_cache=False).logits
            q_out["logits"] = q_model(input_ids=batch.to(model_device(q_model)), use_cache=False).logits
            for n in signal:
                ref, test = fp_out[n].double(), q_out[n].to(fp_out[n].device).double()
                signal[n] += float((ref * ref).sum())
                noise[n] += float(((ref - test) ** 2).sum())
    finally:
        for h in handles:
            h.remove()
    return {n: (math.inf if noise[n] == 0 else 10.0 * math.log10(signal[n] / noise[n])) for n in signal}


def format_sqnr_table(report: dict[str, float]) -> str:
    width = max(len(n) for n in report)
    lines = [f"{'module'.ljust(width)}  SQNR (dB)"]
    lines += [f"{n.ljust(width)}  {v:9.2f}" for n, v in report.items()]
    return "\n".join(lines)


def save_json(results: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)


__all__ = ["sqnr", "perplexity", "last_token_accuracy", "layer_sqnr", "format_sqnr_table"]
