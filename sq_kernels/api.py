"""The user API: ``smoothquant(model, data, config)`` in one call, or its steps
``collect_act_stats`` -> ``smooth_`` -> ``quantize_``.

    import sq_kernels as sq
    report = sq.smoothquant(model, "calib.txt", sq.SmoothQuantConfig(alpha=0.85), tokenizer=tok)
    print(report)                  # what was converted, what stayed in floating point and why
    sq.save_quantized(model, "out/")

``quantize_`` swaps every selected ``nn.Linear`` (and fused MoE experts module) for its W8A8 version.
It decides everything and checks every weight first, so bad input leaves the model unchanged; then it
converts module by module, freeing each floating-point original before building the next (peak memory:
the model plus one module). ``atomic=True`` builds every new module before touching the model instead
(any error leaves it unchanged; peak: the model plus its int8 copy). Modules that stay in floating point
are listed with their reason (and warned about when the kernels cannot run them), never skipped silently.
A module registered under several names is converted once and installed at every name; hooks registered
on a replaced module move to its W8A8 version; a tied ``lm_head`` that is quantized gets its own int8 copy,
and the model's config stops asking transformers to tie it again.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from .calibration import (ActStats, calibration_batches, check_in_memory, check_stats_match_smoothing,
                          check_stats_source, collect_act_stats)
from .checkpoint import guard_hf_saving
from .config import SmoothQuantConfig, as_config, pattern_matches
from .families import UnsupportedModelError, family_of, is_user_table
from .nn import W8A8Experts, W8A8Linear
from .nn.convert import (PartialConversionError, build_modules, check_dtypes, check_sources, convert_in_place,
                         plan_conversion, swap_modules, warn_kept)
from .smooth import SmoothReport, smooth_


@dataclass
class ConversionReport:
    """``converted``: module name -> scheme; ``kept``: module name -> why it stays in floating point;
    ``smoothing``: the ``SmoothReport`` when the model was smoothed; ``shared``: other name -> the name
    under which a module registered twice is listed (its W8A8 version is installed at both); ``notes``:
    what else changed (a tied weight untied)."""
    converted: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    smoothing: SmoothReport | None = None
    config: dict | None = None
    shared: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"converted": dict(self.converted), "kept": dict(self.kept), "config": self.config,
                "smoothing": self.smoothing.to_dict() if self.smoothing is not None else None,
                "shared": dict(self.shared), "notes": list(self.notes)}

    def __str__(self) -> str:
        lines = [f"W8A8: {len(self.converted)} module(s) converted, {len(self.kept)} kept in floating point"]
        schemes: dict[str, int] = {}
        for scheme in self.converted.values():
            schemes[scheme] = schemes.get(scheme, 0) + 1
        lines += [f"  {n} x {scheme}" for scheme, n in schemes.items()]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        lines += [f"  {alias}: the same module as {name} (treated with it)" for alias, name in self.shared.items()]
        lines += [f"  note: {note}" for note in self.notes]
        if self.smoothing is not None:
            lines.append(str(self.smoothing))
        return "\n".join(lines)


def _family_or_none(model, config: SmoothQuantConfig):
    try:
        return family_of(model, config.family)
    except UnsupportedModelError:
        return None


def _check_quantizable(model, spec, what: str) -> None:
    """The family's refusal of configurations no quantized module can serve (BLOOM's slow_but_exact), before
    anything changes."""
    reason = spec.quantize_refusal(getattr(model, "config", None)) if spec is not None else None
    if reason:
        raise ValueError(f"{what}: {spec.name}: cannot quantize this model: {reason}")


def _tied_weights(model: nn.Module, plan) -> dict[str, list[str]]:
    """``{name: [other parameter names]}`` for planned linears whose weight is also another module's parameter
    (a tied lm_head and embedding)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = {}
    for e in plan.converted:
        if e.kind != "linear":
            continue
        own = {f"{n}.weight" if n else "weight" for n in [e.name] + e.aliases}
        others = [n for n in owners.get(id(e.module.weight), []) if n not in own]
        if others:
            tied[e.name] = others
    return tied


def _untie(model: nn.Module, plan, tied: dict[str, list[str]], tied_head: set[str]) -> list[str]:
    """Notes on the tied weights whose linear is now W8A8 (an int8 copy of its own). When that linear is the
    model's output embedding (named in ``tied_head``), ``tie_word_embeddings`` is set to False in the config
    (and its text_config), so that transformers' ``tie_weights()`` (resize_token_embeddings, PEFT, loading)
    cannot put the floating-point embedding in place of the int8 weight."""
    done = [e for e in plan.converted if e.name in tied and isinstance(e.module, (W8A8Linear, W8A8Experts))]
    notes = [f"{e.name}: its weight was tied to {', '.join(tied[e.name])}; the W8A8 module holds its own int8 "
             f"copy, so they are no longer tied" for e in done]
    if any(e.name in tied_head for e in done):
        config = getattr(model, "config", None)
        flipped = []
        for where, c in (("config", config), ("config.text_config", getattr(config, "text_config", None))):
            if c is not None and getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
                flipped.append(f"{where}.tie_word_embeddings")
        if flipped:
            notes.append(f"set {' and '.join(flipped)} to False, so that transformers' tie_weights() cannot replace "
                         f"the int8 lm_head weight by the floating-point embedding")
    return notes


def _record_partial(model: nn.Module, plan) -> None:
    """``model.sq_partial_conversion = {"converted": [...], "remaining": [...]}`` after a conversion stopped
    half-way (names converted by an earlier partial call included); save_quantized refuses such a model."""
    done = [e.name for e in plan.converted if isinstance(e.module, (W8A8Linear, W8A8Experts))]
    remaining = [e.name for e in plan.converted if not isinstance(e.module, (W8A8Linear, W8A8Experts))]
    before = getattr(model, "sq_partial_conversion", None)
    earlier = list(before.get("converted", [])) if isinstance(before, dict) else []
    try:
        model.sq_partial_conversion = {"converted": list(dict.fromkeys(earlier + done)), "remaining": remaining}
    except AttributeError:
        pass


class _EveryStat:
    """Stands in for statistics in a dry plan made before calibration: every module "has" them."""

    def __contains__(self, name) -> bool:
        return True


def _require_conversions(model: nn.Module, plan, what: str) -> None:
    if plan.converted:
        return
    conv1d = sum(type(m).__name__ == "Conv1D" for m in model.modules())
    if conv1d:  # GPT-2 style: transformers' Conv1D is a transposed linear, not an nn.Linear
        raise ValueError(f"{what}: {type(model).__name__} keeps its projections in {conv1d} transformers Conv1D "
                         f"modules (GPT-2 style), not nn.Linear: sq_kernels converts nn.Linear (and fused MoE "
                         f"experts) only, so nothing would be converted")
    if not plan.kept:
        raise ValueError(f"{what}: {type(model).__name__} has no nn.Linear (or fused MoE experts) module to convert")
    done = [e.name for e in plan.kept if e.kind == "quantized"]
    if done:
        others = len(plan.kept) - len(done)
        raise ValueError(f"{what}: {type(model).__name__} is already quantized: {len(done)} module(s) are W8A8 "
                         f"(e.g. {done[0]}) and nothing is left to convert"
                         + (f" ({others} other candidate(s) stay in floating point by the rules)" if others else ""))
    reasons: dict[str, list[str]] = {}
    for e in plan.kept:
        reasons.setdefault(e.reason, []).append(e.name)
    listed = "; ".join(f"{why} ({len(names)}, e.g. {names[0]})" for why, names in list(reasons.items())[:4])
    raise ValueError(f"{what}: no module would be converted: all {len(plan.kept)} candidate(s) of "
                     f"{type(model).__name__} stay in floating point: {listed}. Check the include / exclude "
                     f"patterns and set_local rules")


def _warn_unmatched_patterns(model: nn.Module, config: SmoothQuantConfig, plan, stacklevel: int = 4) -> None:
    """A pattern (or class name) of include / exclude / set_local that matches no candidate module is almost
    always a typo, and its rule silently does nothing: say so."""
    default = SmoothQuantConfig(progress=False)
    seen = [(n, e.module) for e in plan.entries for n in [e.name] + e.aliases]
    example = seen[0][0] if seen else None
    for rule, patterns, defaults in (("include", config.include, default.include),
                                     ("exclude", config.exclude, default.exclude),
                                     ("set_local", tuple(config.local), ())):
        for pattern in patterns:
            if pattern in defaults or any(pattern_matches(pattern, name, module) for name, module in seen):
                continue
            warnings.warn(f"{rule} pattern {pattern!r} matches no module of {type(model).__name__}, so its rule does "
                          f"nothing (module names look like {example!r}; a pattern matches the full name (fnmatch), "
                          f"its end after a dot, or a class name)", UserWarning, stacklevel=stacklevel)
    for pattern, value in config.local.items():  # a scheme rule whose every module stays in floating point anyway
        if value == "fp":
            continue
        hit = [e for e in plan.entries if any(pattern_matches(pattern, n, e.module) for n in [e.name] + e.aliases)]
        if hit and all(e.scheme is None and e.kind != "quantized" for e in hit):
            why = "; ".join(f"{e.name}: " + ("not an nn.Linear or fused experts module, so it cannot be quantized"
                                             if e.kind == "other" else e.reason) for e in hit[:3])
            warnings.warn(f"set_local({pattern!r}, ...) gives a scheme, but every module it matches stays in floating "
                          f"point for another reason, so the rule does nothing ({why}"
                          f"{f'; and {len(hit) - 3} more' if len(hit) > 3 else ''})", UserWarning,
                          stacklevel=stacklevel)


def _nothing_converted(exc: Exception) -> Exception:
    if isinstance(exc, ValueError):
        return type(exc)(f"{exc}\n(quantize_ stopped before changing the model: nothing was converted)")
    return RuntimeError(f"quantize_ failed while building W8A8 modules; nothing was converted: {exc}")


def quantize_(model: nn.Module, config: SmoothQuantConfig | None = None,
              stats: ActStats | None = None, *, atomic: bool = False) -> ConversionReport:
    """Replace the selected linears (and fused experts) of ``model`` by W8A8 modules, in place.

    Args:
        model: any ``nn.Module`` (typically a smoothed HF causal LM).
        config: scheme, include/exclude patterns and ``set_local`` rules (default: per-channel weights,
            per-token dynamic activations, ``lm_head`` kept in floating point).
        stats: statistics of the (smoothed) model; required by the static scheme.
        atomic: build every W8A8 module before swapping any (needs memory for the model plus its int8
            copy). Default: module by module, each floating-point original freed before the next is built
            (the model plus one module), unless something else holds it.

    Returns:
        ``ConversionReport``.

    Raises:
        ValueError: bad input (patterns, statistics, NaN/Inf weights); nothing was converted.
        PartialConversionError: (default mode) a failure past the checks, e.g. out of memory; its
            ``converted`` modules are W8A8, its ``remaining`` ones untouched, the model still runs, and
            calling ``quantize_`` again converts the rest. With ``atomic=True`` such failures convert nothing.
    """
    if not isinstance(atomic, bool):
        raise ValueError(f"quantize_: atomic must be True or False, got {atomic!r}")
    return _quantize(model, config, stats, warn_patterns=True, atomic=atomic)


def _quantize(model: nn.Module, config: SmoothQuantConfig | None, stats: ActStats | None,
              warn_patterns: bool, atomic: bool = False) -> ConversionReport:
    config = as_config(config, "quantize_")
    check_in_memory(model, "quantize_")
    if stats is not None:
        check_stats_source(model, stats, "quantize_")
        if config.needs_static_scales():  # only static scales are read from the statistics
            check_stats_match_smoothing(model, stats, "quantize_")
    spec = _family_or_none(model, config)
    _check_quantizable(model, spec, "quantize_")
    plan = plan_conversion(model, config, stats, spec)
    if warn_patterns:
        _warn_unmatched_patterns(model, config, plan)
    _require_conversions(model, plan, "quantize_")
    check_dtypes(plan, "quantize_")
    warn_kept(plan)
    tied = _tied_weights(model, plan)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if tied and callable(get_head) else None
    tied_head = {e.name for e in plan.converted if e.name in tied and head is not None and e.module is head}
    try:
        if atomic:  # building every module before any swap is itself the check
            new_modules = build_modules(plan, stats, progress=config.progress)
        else:  # module by module: refuse bad input before the first swap
            check_sources(plan, stats)
    except Exception as exc:
        raise _nothing_converted(exc) from exc
    if atomic:
        swap_modules(model, new_modules)
        for e in plan.converted:
            e.module = new_modules[e.name]
        del new_modules
    else:
        try:
            convert_in_place(model, plan, stats, progress=config.progress)
        except PartialConversionError as exc:
            if not exc.converted:  # the first module failed: as if nothing had started
                raise _nothing_converted(exc.__cause__) from exc.__cause__
            _record_partial(model, plan)
            _untie(model, plan, tied, tied_head)
            guard_hf_saving(model)  # int8 modules are in: save_pretrained would write them as floats
            raise
        except BaseException:
            if any(isinstance(e.module, (W8A8Linear, W8A8Experts)) for e in plan.converted):
                _record_partial(model, plan)
                _untie(model, plan, tied, tied_head)
            if any(isinstance(m, (W8A8Linear, W8A8Experts)) for m in model.modules()):
                guard_hf_saving(model)
            raise
    notes = _untie(model, plan, tied, tied_head)
    # modules an earlier call converted (resuming after a PartialConversionError) are converted, with their scheme
    converted = {e.name: str(e.scheme) if e.scheme is not None else e.module.scheme() for e in plan.entries
                 if e.scheme is not None or e.kind == "quantized"}
    report = ConversionReport(converted, {e.name: e.reason for e in plan.kept if e.kind != "quantized"},
                              config=config.to_dict(),
                              shared={a: e.name for e in plan.entries for a in e.aliases}, notes=notes)
    if "sq_partial_conversion" in getattr(model, "__dict__", {}):  # this call finished what an earlier one left
        del model.sq_partial_conversion
    smoothing = getattr(model, "sq_smoothing", None)
    try:
        model.sq_quantization = {"config": config.to_dict(), "converted": dict(report.converted),
                                 "kept": dict(report.kept), "smoothing": smoothing}
    except AttributeError:
        pass
    guard_hf_saving(model)  # save_pretrained would write int8 weights that from_pretrained reads as floats
    return report


def smoothquant(model: nn.Module, data=None, config: SmoothQuantConfig | None = None, tokenizer=None,
                stats: ActStats | None = None) -> ConversionReport:
    """Calibrate, smooth and quantize ``model`` in place: the whole SmoothQuant recipe in one call.

    Args:
        model: an HF causal LM of a supported family (``sq_kernels.families.supported_model_types()``: OPT,
            Llama, Mistral, Mixtral, BLOOM, Falcon, Qwen2, Qwen3, Qwen2/3-MoE, Phi-3, Gemma 1/2/3), or any
            model with ``config.family`` given.
        data: calibration data (token tensors, strings with ``tokenizer``, a local .txt / .jsonl path); may be
            None when ``stats`` is given and alpha is not "auto" (then it is not read at all).
        config: ``SmoothQuantConfig``.
        tokenizer: for text data.
        stats: statistics collected before (skips the calibration run).

    Returns:
        ``ConversionReport`` with the ``SmoothReport`` attached.
    """
    config = as_config(config, "smoothquant")
    check_in_memory(model, "smoothquant")
    if config.smooth:
        # unsupported architectures fail here, listing the supported ones
        spec = family_of(model, config.family, pairs=config.fold_linear_pairs)
        reason = spec.refusal(getattr(model, "config", None))
        if reason:
            raise ValueError(f"{spec.name}: cannot smooth this model: {reason}")
        if is_user_table(spec, config.family):  # proven before calibrating, not after
            from .families.auto import prove_table
            prove_table(model, spec, config.fold_linear_pairs)
    # What would be converted is known before any calibration: a pattern that matches nothing fails now,
    # not after a calibration pass over a large model.
    quant_spec = _family_or_none(model, config)
    _check_quantizable(model, quant_spec, "smoothquant")
    dry = plan_conversion(model, config, _EveryStat(), quant_spec)
    _warn_unmatched_patterns(model, config, dry, stacklevel=3)
    _require_conversions(model, dry, "smoothquant")
    check_dtypes(dry, "smoothquant")
    del dry  # it holds every module: quantize_ frees each floating-point original as it converts it
    needs_data = stats is None or (config.smooth and config.alpha == "auto")
    if data is None and needs_data:
        raise ValueError("smoothquant: data is required (calibration data: token tensors, strings with tokenizer=, "
                         "or a local .txt / .jsonl path)" + ("" if stats is None else
                                                             "; alpha='auto' evaluates candidates on it"))
    batches = (calibration_batches(data, tokenizer, config.num_samples, config.seq_len, config.batch_size)
               if needs_data else None)
    if stats is None:
        stats = collect_act_stats(model, batches, family=config.family, progress=config.progress,
                                  device=config.calibration_device)
    smoothing = None
    quant_stats = stats
    if config.smooth:
        smoothing = smooth_(model, stats, config, data=batches)
        quant_stats = smoothing.stats
    try:
        report = _quantize(model, config, quant_stats, warn_patterns=False)  # warned above, before calibrating
    except Exception as exc:
        if smoothing is None:
            raise
        if isinstance(exc, PartialConversionError):
            raise PartialConversionError(f"{exc}\n(the model was smoothed first, which leaves its outputs "
                                         f"unchanged)", exc.converted, exc.remaining) from exc
        raise type(exc)(f"{exc}\n(the model was smoothed, which leaves its outputs unchanged, but not quantized)") \
            if isinstance(exc, ValueError) else RuntimeError(
                f"the model was smoothed but quantization failed: {exc}") from exc
    report.smoothing = smoothing
    return report


__all__ = ["ConversionReport", "PartialConversionError", "quantize_", "smooth_", "smoothquant", "SmoothQuantConfig",
           "collect_act_stats"]
