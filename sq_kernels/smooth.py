"""Smoothing: migrate activation outliers into the weights, folded offline into the model.

For a group of modules that share one input ``X [T, K]`` (a norm's output feeding q/k/v, ...)::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      j = 0..K-1, max|W_j| over every module of the group
    norm.weight /= s   (and norm.bias /= s)          or, for a linear source, its output rows and bias /= s
    W[..., j]   *= s_j for every module of the group

so ``(X / s) (s W) = X W``: the model computes the same function (up to float rounding) while the
activations it quantizes lose their outlier channels. Guards: alpha must lie in [0, 1]; statistics
must be finite; a channel whose activation is zero everywhere gets ``s = 1``; ``max|W_j|`` is floored at
1e-5 and ``s`` clamped to [1e-5, 1e5] so no fold divides by (almost) zero.

``alpha="auto"`` searches ``config.alpha_grid`` per decoder layer: each candidate smooths and quantizes a
copy of the layer, runs it on the calibration inputs of that layer, and the alpha with the smallest mean
squared error against the floating-point layer's output wins (Intel Neural Compressor's auto mode,
block-wise). The search never modifies the model; all folds happen at the end, after every check passed.
"""
from __future__ import annotations

import copy
import json
import hashlib
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import (ActStats, _layerwise_runner, calibration_batches, check_in_memory,
                          check_stats_match_smoothing, check_stats_source, check_token_ids, eval_mode, is_smoothed,
                          model_device, run_model, smoothing_id)
from .config import SmoothQuantConfig, alpha_key, as_config, check_alpha
from .families import FamilySpec, decoder_layers, family_of, get_submodule, is_user_table
from .layerwise import LayerwiseRun, hidden_out

W_FLOOR = 1e-5
S_MIN, S_MAX = 1e-5, 1e5


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s [K]`` (float32) from ``max|X_j|`` and ``max|W_j|`` (both ``[K]``), with the guards above."""
    check_alpha(alpha)
    a = act_absmax.detach().to(torch.float64)
    w = weight_absmax.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != w.shape or a.dim() != 1:
        raise ValueError(f"smoothing_scale: activation {tuple(a.shape)} and weight {tuple(w.shape)} statistics must "
                         f"both be [K]")
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()):
        raise ValueError("smoothing_scale: statistics contain NaN or Inf; refusing to smooth with them")
    if (a < 0).any() or (w < 0).any():
        raise ValueError("smoothing_scale: absolute maxima must be >= 0")
    s = a.pow(alpha) / torch.clamp_min(w, W_FLOOR).pow(1.0 - alpha)
    s = torch.where(a > 0, s.clamp(S_MIN, S_MAX), torch.ones_like(s))
    return s.to(torch.float32)


def input_weight(module: nn.Module, name: str = "module") -> torch.Tensor:
    """The tensor whose last dimension is this module's input channels: ``nn.Linear.weight [N, K]``, fused
    experts ``gate_up_proj [E, 2I, K]``, a router's ``weight [E, K]``."""
    from .nn import W8A8Experts, W8A8Linear
    if isinstance(module, (W8A8Linear, W8A8Experts)):
        raise ValueError(f"{name} is already quantized; smooth the floating-point model before quantize_")
    for attr in ("gate_up_proj", "weight"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t
    raise ValueError(f"{name} ({type(module).__name__}) has no weight with input channels to scale")


def weight_absmax(modules: dict[str, nn.Module]) -> torch.Tensor:
    """``max|W_j|`` over every module of a group: float32 ``[K]``."""
    out = None
    for name, module in modules.items():
        w = input_weight(module, name).detach()
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
        cur = w.abs().reshape(-1, w.shape[-1]).amax(dim=0).to(torch.float32)
        if out is not None and out.shape != cur.shape:
            raise ValueError(f"smoothing group mixes input widths {out.shape[0]} and {cur.shape[0]} ({name})")
        out = cur if out is None else torch.maximum(out, cur)
    return out


@dataclass
class GroupPlan:
    """One smoothing vector: ``source`` (relative to ``layer``) feeds ``targets``."""
    layer: str
    source: str
    kind: str
    targets: tuple[str, ...]
    act: torch.Tensor   # max|X_j| [K]
    w: torch.Tensor     # max|W_j| [K]
    weight_offset: float = 0.0  # the norm scales by (offset + weight): Gemma

    def full(self, rel: str) -> str:
        return f"{self.layer}.{rel}"


@dataclass
class SmoothReport:
    """What ``smooth_`` did: the alpha per decoder layer, each group's scale range, the statistics after
    smoothing (for static scales), and, for ``alpha="auto"``, the loss of every candidate."""
    family: str
    alphas: dict[str, float]
    groups: list[dict]
    stats: ActStats | None = None
    search: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    # per group (keyed by its source's full name): act / weight abs-max [K] before smoothing, the scale s, the
    # alpha and the targets; for plots.plot_smoothing. Not in to_dict: JSON keeps the summary only.
    vectors: dict[str, dict] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"family": self.family, "alphas": dict(self.alphas), "groups": list(self.groups),
                "search": {k: dict(v) for k, v in self.search.items()}, "skipped": list(self.skipped)}

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    def __str__(self) -> str:
        lines = [f"SmoothQuant smoothing ({self.family}): {len(self.groups)} groups"]
        for layer, alpha in self.alphas.items():
            lines.append(f"  {layer}: alpha={alpha:g}")
        for note in self.skipped:
            lines.append(f"  not smoothed: {note}")
        return "\n".join(lines)


def _check_source(layer: nn.Module, lname: str, group, width: int) -> nn.Module:
    source = get_submodule(layer, group.source)
    name = f"{lname}.{group.source}"
    if group.kind == "linear":
        if not isinstance(source, nn.Linear):
            raise ValueError(f"{name}: a linear smoothing source must be an nn.Linear, got {type(source).__name__}")
        if source.out_features != width:
            raise ValueError(f"{name}: out_features={source.out_features} does not match its consumers' {width} inputs")
        return source
    weight = getattr(source, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        raise ValueError(f"{name} ({type(source).__name__}) has no affine weight of shape [{width}] to fold the "
                         f"smoothing scales into")
    bias = getattr(source, "bias", None)
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (width,):
        raise ValueError(f"{name}: bias of shape {tuple(bias.shape)}, expected [{width}]")
    return source


def plan_smoothing(model, stats: ActStats, config: SmoothQuantConfig,
                   spec: FamilySpec) -> tuple[list[GroupPlan], list[str]]:
    """Resolve the family table against ``model`` and the statistics; every check happens here, before
    anything is modified. Returns the groups and notes on groups that do not apply."""
    if not isinstance(stats, ActStats):
        raise ValueError(f"stats must be an ActStats (from collect_act_stats or ActStats.load), "
                         f"got {type(stats).__name__}")
    model_config = getattr(model, "config", None)
    reason = spec.refusal(model_config)
    if reason:
        raise ValueError(f"{spec.name}: cannot smooth this model: {reason}")
    plans, skipped = [], []
    if config.fold_linear_pairs:
        skipped += [f"{g.source} -> {', '.join(g.targets)} ({g.note or 'not applicable to this configuration'})"
                    for g in spec.skipped_pairs(model_config)]
    layers = decoder_layers(model, spec)
    if not layers:
        raise ValueError(f"{spec.name}: the model has no decoder layers at {spec.layers!r}")
    for lname, layer in layers:
        for group in spec.active_groups(model_config, config.fold_linear_pairs):
            if not group.present(layer):
                continue
            targets = {f"{lname}.{t}": get_submodule(layer, t) for t in group.targets}
            w = weight_absmax(targets)
            act = None
            for tname in targets:
                a = stats[tname]
                if a.dim() != 1 or a.shape[0] != w.shape[0]:
                    raise ValueError(f"statistics for {tname} have {tuple(a.shape)} channels but its weight has "
                                     f"{w.shape[0]} inputs: the statistics were collected on a different model")
                act = a if act is None else torch.maximum(act, a)
            if not torch.isfinite(act).all():
                raise ValueError(f"non-finite activation statistics for {list(targets)}; refusing to smooth")
            _check_source(layer, lname, group, w.shape[0])
            plans.append(GroupPlan(lname, group.source, group.kind, tuple(group.targets), act, w,
                                   group.weight_offset))
    if not plans:
        why = ("the table has no groups" if not spec.groups else
               f"the table's {len(spec.groups)} group(s) are excluded by their when= / in_layer= conditions")
        warnings.warn(f"{spec.name}: no smoothing group applies to this model's {len(layers)} decoder layers at "
                      f"{spec.layers!r} ({why}), so nothing is smoothed; check the table, or quantize without "
                      f"smoothing on purpose with smooth=False", UserWarning, stacklevel=3)
    return plans, skipped


@torch.no_grad()
def fold_(layer: nn.Module, plan: GroupPlan, s: torch.Tensor) -> None:
    """Fold ``s`` into ``layer`` (the real layer or a copy of it): source divided, targets multiplied."""
    source = get_submodule(layer, plan.source)
    if plan.kind == "linear":
        w = source.weight
        w.copy_((w.to(torch.float32) / s.to(w.device).unsqueeze(1)).to(w.dtype))
    else:
        w, offset = source.weight, plan.weight_offset
        w.copy_(((w.to(torch.float32) + offset) / s.to(w.device) - offset).to(w.dtype))
    bias = getattr(source, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.to(torch.float32) / s.to(bias.device)).to(bias.dtype))
    for target in plan.targets:
        t = input_weight(get_submodule(layer, target), target)
        t.copy_((t.to(torch.float32) * s.to(t.device)).to(t.dtype))


def _smoothing_digest(model, plans, scales) -> str:
    """The identity of a smoothing: a digest of the smoothing before it (if any), and of every group's name
    and scale vector. Two copies smoothed alike share it (their statistics are the same); another alpha,
    other statistics or a second smoothing give another."""
    h = hashlib.sha256((smoothing_id(model) or "").encode())
    for p, s in zip(plans, scales):
        h.update(p.full(p.source).encode())
        h.update(s.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _check_fold_fits(layer: nn.Module, plan: GroupPlan, s: torch.Tensor, alpha) -> None:
    """What ``fold_`` would write stays finite in each tensor's dtype: a near-dead activation channel (max |x|
    tiny) with a large alpha gives s down to ``S_MIN``, and a float16 norm weight divided by it overflows
    (inf, then NaN logits). Refused before anything is folded, naming the group and the channel."""
    source = get_submodule(layer, plan.source)
    checks = []  # (what, per-channel |value| after folding, dtype)
    w = source.weight
    if plan.kind == "linear":
        checks.append(("weight", w.detach().abs().to(torch.float32).amax(dim=1) / s.to(w.device), w.dtype))  # rows
    else:
        offset = plan.weight_offset
        checks.append(("weight", ((w.detach().to(torch.float32) + offset) / s.to(w.device) - offset).abs(), w.dtype))
    bias = getattr(source, "bias", None)
    if isinstance(bias, torch.Tensor):
        checks.append(("bias", bias.detach().abs().to(torch.float32) / s.to(bias.device), bias.dtype))
    for target in plan.targets:
        t = input_weight(get_submodule(layer, target), target)
        checks.append((f"{target} weight", plan.w.to(t.device, torch.float32) * s.to(t.device), t.dtype))
    for what, values, dtype in checks:
        if not dtype.is_floating_point:
            continue
        limit = torch.finfo(dtype).max
        over = (~torch.isfinite(values)) | (values > limit)
        if over.any():
            j = int(over.nonzero()[0, 0])
            raise ValueError(f"{plan.full(plan.source)}: smoothing with alpha={alpha} would take the {what} of channel "
                             f"{j} to {float(values[j]):.3g}, "
                             f"beyond {dtype}'s range (max {limit:.3g}); its activation maximum is "
                             f"{float(plan.act[j]):.3g} (s = {float(s[j]):.3g}). Use a smaller alpha, or smooth the "
                             f"model in float32 or bfloat16 and cast it afterwards")


def _resolve_alpha(config: SmoothQuantConfig, spec: FamilySpec):
    alpha = config.alpha
    if alpha is None:
        return spec.default_alpha
    if alpha == "auto":
        return "auto"
    check_alpha(alpha)
    return float(alpha)


def smooth_(model, stats: ActStats, config: SmoothQuantConfig | None = None, data=None, tokenizer=None) -> SmoothReport:
    """Smooth ``model`` in place (its outputs do not change, up to float rounding).

    Args:
        model: an HF causal LM of a supported family (or any model with ``config.family`` set).
        stats: ``ActStats`` from ``collect_act_stats`` on this model.
        config: alpha (``None``: the family default; a number in [0, 1]; ``"auto"``), ``fold_linear_pairs``,
            ``family`` and, for the auto search, the quantization scheme the search assumes.
        data / tokenizer: calibration data; required for ``alpha="auto"``.

    Returns:
        ``SmoothReport`` (alpha per layer; ``.stats`` are the statistics after smoothing).
    """
    config = as_config(config, "smooth_")
    check_in_memory(model, "smooth_")
    spec = family_of(model, config.family, pairs=config.fold_linear_pairs)
    user_table = is_user_table(spec, config.family)
    alpha = _resolve_alpha(config, spec)
    plans, skipped = plan_smoothing(model, stats, config, spec)
    if user_table and plans:  # a hand-written table is proven on the model before anything is folded
        from .families.auto import prove_table
        prove_table(model, spec, config.fold_linear_pairs)
    check_stats_source(model, stats, "smooth_")
    check_stats_match_smoothing(model, stats, "smooth_")
    if is_smoothed(model) and stats.meta.get("smoothed") is None:  # statistics saved before this was recorded
        warnings.warn("smooth_: this model was already smoothed; if these statistics were collected before that, "
                      "smoothing again scales the same channels twice, which keeps the model equivalent but can "
                      "cost much of its quantized accuracy. Smooth the original model once", stacklevel=2)
    layer_names = list(dict.fromkeys(p.layer for p in plans))
    search = {}
    if alpha == "auto":
        if data is None:
            raise ValueError("alpha='auto' needs calibration data (data=...) to evaluate each candidate alpha")
        alphas, search = search_alpha(model, stats, config, spec, plans, data, tokenizer)
    else:
        alphas = {name: alpha for name in layer_names}
    scales = []
    for p in plans:
        s = smoothing_scale(p.act, p.w, alphas[p.layer])
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise ValueError(f"{p.full(p.source)}: smoothing scales are not finite and positive")
        scales.append(s)
    layers = dict(decoder_layers(model, spec))
    for p, s in zip(plans, scales):  # every group is checked before any is folded
        _check_fold_fits(layers[p.layer], p, s, alphas[p.layer])
    done = 0
    try:
        for p, s in zip(plans, scales):
            fold_(layers[p.layer], p, s)
            done += 1
    except Exception as exc:
        raise RuntimeError(f"smoothing failed at {p.full(p.source)} after {done} of {len(plans)} groups were folded "
                           f"(the model is only partly smoothed; reload it): {exc}") from exc
    divisors = {}
    groups = []
    for p, s in zip(plans, scales):
        for t in p.targets:
            divisors[p.full(t)] = s
        groups.append({"layer": p.layer, "source": p.source, "targets": list(p.targets), "alpha": alphas[p.layer],
                       "s_min": float(s.min()), "s_max": float(s.max())})
    vectors = {}
    for p, s in zip(plans, scales):
        key = p.full(p.source)
        if key in vectors:  # one source feeding two groups: name both by their targets
            key = f"{key} -> {', '.join(p.targets)}"
        vectors[key] = {"act": p.act.detach().cpu(), "weight": p.w.detach().cpu(), "scale": s.detach().cpu(),
                        "alpha": alphas[p.layer], "targets": [p.full(t) for t in p.targets]}
    sid = _smoothing_digest(model, plans, scales)  # this smoothing: its statistics fit no other
    report = SmoothReport(spec.name, alphas, groups, stats.scaled(divisors, sid), search, skipped, vectors)
    try:
        model.sq_smoothing = {**report.to_dict(), "id": sid}
        if getattr(model, "config", None) is not None:  # written by save_pretrained: survives a reload
            model.config.sq_smoothed = {"family": spec.name, "alphas": dict(alphas), "id": sid}
    except AttributeError:
        pass
    return report


# -------------------------------------------------------------------------------------- alpha search


def _trial_loss(layer, lname, plans, alpha, stats, config, spec, inputs, targets_out) -> float:
    from .nn.convert import build_modules, plan_conversion, swap_modules
    trial = copy.deepcopy(layer)
    divisors = {}
    for p in plans:
        s = smoothing_scale(p.act, p.w, alpha)
        fold_(trial, p, s)
        for t in p.targets:
            divisors[p.full(t)] = s
    trial_stats = stats.scaled(divisors) if divisors else stats
    plan = plan_conversion(trial, config, trial_stats if config.needs_static_scales() else None, spec, prefix=lname)
    swap_modules(trial, build_modules(plan, trial_stats), prefix=lname)
    sq_err, count = 0.0, 0
    for (args, kwargs), y in zip(inputs, targets_out):
        y_q = hidden_out(trial(*args, **kwargs))
        diff = y_q.to(torch.float64) - y.to(torch.float64)
        sq_err += float((diff * diff).sum())
        count += diff.numel()
    return sq_err / max(count, 1)


@torch.no_grad()
def search_alpha(model, stats: ActStats, config: SmoothQuantConfig, spec: FamilySpec, plans: list[GroupPlan],
                 data, tokenizer=None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per decoder layer, the alpha of ``config.alpha_grid`` whose smoothed + quantized layer best matches
    the floating-point layer on calibration inputs. Does not modify ``model``."""
    batches = calibration_batches(data, tokenizer, config.num_samples, config.seq_len, config.batch_size)
    batches = batches[:config.alpha_search_batches]
    layers = decoder_layers(model, spec)
    by_layer: dict[str, list[GroupPlan]] = {}
    for p in plans:
        by_layer.setdefault(p.layer, []).append(p)
    for batch in batches:
        check_token_ids(model, batch)
    alphas, losses = {}, {}

    def visit(lname, layer, inputs, fp_out):
        layer_plans = by_layer.get(lname, [])
        if not layer_plans:
            return
        trials = [(float(alpha), _trial_loss(layer, lname, layer_plans, alpha, stats, config, spec, inputs, fp_out))
                  for alpha in config.alpha_grid]
        losses[lname] = {alpha_key(alpha): loss for alpha, loss in trials}
        finite = [(loss, alpha) for alpha, loss in trials if math.isfinite(loss)]
        if not finite:
            raise ValueError(f"alpha search: every candidate alpha gives a non-finite error on {lname}")
        alphas[lname] = min(finite, key=lambda t: t[0])[1]  # the grid's own value; the first of equal losses

    runner = _layerwise_runner(model, batches, config.calibration_device, spec, "alpha search") or \
        LayerwiseRun(model, layers, batches, model_device(model), run_model)
    with eval_mode(model), runner:  # every layer gets its own recorded arguments (Gemma 2/3: sliding vs global)
        runner.walk(visit, progress=config.progress, desc="alpha search")
    return alphas, losses
