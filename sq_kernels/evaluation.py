"""Evaluation on local data: perplexity with sliding windows, LAMBADA-style last-word accuracy, and a
per-layer SQNR report of a quantized model against its floating-point original.

SQNR (signal-to-quantization-noise ratio) is ``20 log10(||ref|| / ||ref - test||)`` dB: 20 dB means an
error of 10 % of the signal's norm, 40 dB 1 %.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .calibration import (_LAST_SPACE, _encode, _is_blank, _is_id_list, _is_numpy_array, _text_file_tokens,
                          _token_tensor, calibration_batches, check_positions, check_positive_int, check_token_ids,
                          eval_mode, is_json_file, model_device, read_text_file, read_texts)


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


DOCUMENT_SEPARATOR = "\n\n"  # between the texts of a list or a JSON(L) file, as in the WikiText evaluations


def _joined_texts(texts: list[str], where: str) -> str:
    """Non-blank ``texts`` joined by a blank line (an empty text would only add separators to score)."""
    kept = [t for t in texts if not _is_blank(t)]
    if not kept:
        held = (f"its {len(texts)} text{'s are' if len(texts) != 1 else ' is'} empty or whitespace only" if texts
                else "no texts")
        raise ValueError(f"data: {where} holds no text ({held})")
    return DOCUMENT_SEPARATOR.join(kept)


def _token_stream(data, tokenizer, needed: int | None = None) -> torch.Tensor:
    """One token stream from a 1-D token tensor / numpy array / list of ints (or a ``[1, T]`` one), a list of
    texts, or a local file: a text file as it is, a .jsonl / .json file's texts (as calibration reads them)
    joined by a blank line. Empty and whitespace-only texts are left out; with no text left it is an error.
    ``needed``: a text file is read only until this many tokens (``perplexity(max_windows=...)``)."""
    if isinstance(data, torch.Tensor) or _is_numpy_array(data):
        ids = _token_tensor(data, "data")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"data: expected one token stream, a 1-D tensor (or [1, T]), got shape "
                             f"{tuple(ids.shape)}: the rows of a [B, T] batch would be scored as one stream, padding "
                             f"included; pass the texts as a list of strings (joined by a blank line) or concatenate "
                             f"the rows yourself")
        return ids.long()
    if isinstance(data, (list, tuple)):
        if data and all(isinstance(t, str) for t in data):
            return _encode(tokenizer, _joined_texts(list(data), "the list of texts"))
        if data and _is_id_list(data):  # ints, numpy integers too
            return _token_tensor(data, "data").long()
        raise ValueError("data: a list must hold texts (strings, scored as one text joined by blank lines) or token "
                         "ids (ints); pass a local text file, a list of strings or a 1-D token tensor")
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(f"data: unsupported type {type(data).__name__} (pass a local text / .jsonl / .json file, a "
                         f"list of strings or a 1-D token tensor)")
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} is not a file (pass a local text / .jsonl / .json file, a list of "
                         f"strings or a 1-D token tensor)")
    if is_json_file(path):
        return _encode(tokenizer, _joined_texts(read_texts(path), repr(str(path))))
    if needed is not None:  # only the start of the file: read and tokenized piece by piece, as calibration does
        return _text_file_tokens(path, tokenizer, needed)
    text = read_text_file(path)
    if _is_blank(text):
        raise ValueError(f"data: {str(path)!r} holds no text (the file is empty or holds only whitespace)")
    return _encode(tokenizer, text)


def _windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """``(begin, end)`` of each window that scores tokens; the last one reaches the end of the stream."""
    windows = []
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        windows.append((begin, end))
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model: nn.Module, data, tokenizer=None, *, seq_len: int = 512, stride: int | None = None,
               max_windows: int | None = None, progress: bool = True) -> float:
    """Perplexity of ``model`` on local text (a text file, a .jsonl / .json file's texts, a list of strings:
    several texts are joined by a blank line) or a 1-D token tensor, with sliding windows.

    Windows of ``seq_len`` tokens start every ``stride`` tokens. A token is scored at most once, by the
    first window that can predict it (it needs one token of context inside the window). With the
    default ``stride = seq_len`` (disjoint windows, as in the SmoothQuant and GPTQ WikiText evaluations)
    the first token of every window is context only; with ``stride < seq_len`` every token but the
    text's first is scored, later windows giving ``seq_len - stride`` tokens of extra context.
    ``max_windows`` (>= 1) evaluates only the first windows; a text file is then read and tokenized only
    as far as they reach (in pieces cut after a newline, as calibration reads it). ``seq_len`` may not exceed
    the positions a model with learned position embeddings has (OPT: max_position_embeddings). The model
    runs in eval mode (no dropout); each module's mode is restored afterwards.
    Returns ``exp(mean negative log-likelihood)`` (``inf``, with a warning, when that overflows a float).
    """
    seq_len = check_positive_int("seq_len", seq_len, minimum=2)
    stride = seq_len if stride is None else check_positive_int("stride", stride)
    if stride > seq_len:
        raise ValueError(f"stride (--stride) must lie in [1, seq_len={seq_len}], got {stride}: a larger stride "
                         f"would skip tokens")
    if max_windows is not None:
        max_windows = check_positive_int("max_windows", max_windows)
    needed = None if max_windows is None else (max_windows - 1) * stride + seq_len
    ids = _token_stream(data, tokenizer, needed)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    check_token_ids(model, ids, positions=False)
    check_positions(model, min(seq_len, ids.numel()), "seq_len")
    device = model_device(model)
    windows = _windows(ids.numel(), seq_len, stride)
    if max_windows is not None:
        windows = windows[:max_windows]
    nll, count, scored_to = 0.0, 0, 1
    with eval_mode(model):
        for begin, end in _progress(windows, progress, desc="perplexity", unit="window"):
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
    try:
        return math.exp(nll / count)
    except OverflowError:  # a broken model: report it as infinite rather than fail at the end of the run
        warnings.warn(f"perplexity: the mean negative log-likelihood is {nll / count:.4g} nats per token; "
                      f"exp() of it overflows a float, reported as inf", UserWarning, stacklevel=2)
        return math.inf


def _encode_target(tokenizer, text: str) -> torch.Tensor:
    try:
        out = tokenizer(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer(text)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return torch.as_tensor(out, dtype=torch.long).reshape(-1)


def _context_and_target(tokenizer, text: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a text's context (everything before its last word) and of the last word."""
    text = text.strip()
    space = _LAST_SPACE.search(text)  # the last whitespace of any kind (a newline, a tab)
    cut = space.start() if space else -1
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
    return context, target


@torch.no_grad()
def last_token_accuracy(model: nn.Module, data, tokenizer, *, max_samples: int | None = None,
                        progress: bool = True) -> float:
    """LAMBADA-style accuracy: the fraction of texts whose last word the model predicts exactly (every
    token of it, greedily) from the preceding context.

    ``data``: a local JSONL file (one ``{"text": ...}`` per line), a .json file (an array of them) or a list
    of strings. ``max_samples`` (>= 1): only the first texts. A text longer than the positions a model with
    learned position embeddings has (OPT: max_position_embeddings) is an error.
    """
    if max_samples is not None:
        max_samples = check_positive_int("max_samples", max_samples)
    if isinstance(data, (str, os.PathLike)):
        if not Path(data).is_file():
            raise ValueError(f"data: {str(data)!r} is not a file (pass a local .jsonl / .json file or a list of "
                             f"strings)")
        if not is_json_file(data):
            raise ValueError(f"data: {str(data)!r} is not a .jsonl / .json file: last-word accuracy scores one text "
                             f"per record (a .jsonl line, a .json array element) or a list of strings")
        texts = read_texts(data)
    elif isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        texts = list(data)
    else:
        raise ValueError(f"data: expected a local .jsonl / .json file or a list of strings, got "
                         f"{type(data).__name__}")
    if max_samples is not None:
        texts = texts[:max_samples]
    if not texts:
        raise ValueError("last_token_accuracy: no texts")
    # every text is tokenized and checked before the model runs on any of them
    problems = []
    for i, text in enumerate(texts):
        context, target = _context_and_target(tokenizer, text, i)
        ids = torch.cat([context, target]).unsqueeze(0)
        check_token_ids(model, ids, positions=False)
        check_positions(model, ids.shape[1], f"data: text {i} (context + last word)", warn=False,
                        remedy="shorten the text or leave it out (each text is scored as one sequence)")
        problems.append((ids, context.numel(), target))
    longest = max(ids.shape[1] for ids, _, _ in problems)
    check_positions(model, longest, "data: the longest text (context + last word)",
                    remedy="shorter texts avoid this")
    device = model_device(model)
    correct = 0
    with eval_mode(model):
        for ids, n_context, target in _progress(problems, progress, desc="last-word accuracy", unit="text"):
            logits = model(input_ids=ids.to(device), use_cache=False).logits[0]
            predicted = logits[n_context - 1:ids.shape[1] - 1].argmax(dim=-1).cpu()
            correct += bool(torch.equal(predicted, target))
    return correct / len(texts)


def _weight_shape(module: nn.Module) -> dict[str, tuple] | None:
    """The shapes that decide a module's output: in/out features of a linear, the expert weights' shapes of
    fused experts (float or W8A8)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return {"in_features": int(module.in_features), "out_features": int(module.out_features)}
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        return {"gate_up_proj": tuple(gate_up.shape), "down_proj": tuple(down.shape)}
    return None


def _describe_shape(shape: dict | None) -> str:
    if shape is None:
        return "no linear weights (not a linear or experts module)"
    return ", ".join(f"{k}={v}" for k, v in shape.items())


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
    for n in names:
        fp_shape, q_shape = _weight_shape(fp_modules[n]), _weight_shape(q_modules[n])
        if fp_shape != q_shape:
            raise ValueError(f"layer_sqnr: module {n!r} has {_describe_shape(fp_shape)} in the reference (fp_model, "
                             f"--reference) but {_describe_shape(q_shape)} in the quantized model: the reference "
                             f"must be the floating-point model that was quantized")
    batches = calibration_batches(data, tokenizer, num_samples, seq_len, 1, use="sqnr")
    for batch in batches:
        check_token_ids(fp_model, batch, positions=False)
        check_token_ids(q_model, batch, positions=False)
    if batches:
        longest = max(int(b.shape[-1]) for b in batches)
        if not check_positions(fp_model, longest, "seq_len"):
            check_positions(q_model, longest, "seq_len")
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
        with eval_mode(fp_model, q_model):
            for batch in _progress(batches, progress, desc="layer SQNR", unit="batch"):
                fp_out["logits"] = fp_model(input_ids=batch.to(model_device(fp_model)), use_cache=False).logits
                q_out["logits"] = q_model(input_ids=batch.to(model_device(q_model)), use_cache=False).logits
                for n in signal:
                    if fp_out[n].shape != q_out[n].shape:
                        raise ValueError(f"layer_sqnr: the output of {n!r} has shape {tuple(fp_out[n].shape)} in "
                                         f"the reference (fp_model, --reference) but {tuple(q_out[n].shape)} in the "
                                         f"quantized model: the reference must be the floating-point model that was "
                                         f"quantized")
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
