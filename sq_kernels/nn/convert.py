"""Swapping floating-point modules for W8A8 ones: plan, build, swap.

``plan_conversion`` decides for every candidate (each ``nn.Linear``, each fused experts module) either a
``Scheme`` or the reason it stays in floating point (include/exclude patterns, ``set_local`` rules, the
family's keep-FP list, a linear whose own ``forward`` W8A8Linear would not reproduce or whose parent reads
its ``.weight`` directly, the kernels' 16-alignment). A module registered under several names is one
candidate (its first name) whose W8A8 version is installed at every name (``PlanEntry.aliases``), taking
over the original's forward hooks. ``check_sources`` then refuses, before anything changes, every planned
module that cannot be quantized (NaN/Inf weights, bad static statistics). Two
ways to install the W8A8 modules:

- ``convert_in_place`` (``quantize_``'s default) builds one module and swaps it in at once, so the
  floating-point original is freed before the next is built: the peak is the model plus one module,
  not the model plus its whole int8 copy (what decides whether a 34B fp16 model can be quantized on an
  80 GB GPU). A failure past the checks (out of memory, an interrupt) raises ``PartialConversionError``
  naming what was converted; every module is either its W8A8 version or untouched, so the model runs,
  and calling ``quantize_`` again converts the rest.
- ``build_modules`` + ``swap_modules`` (``atomic=True``) build everything first: any failure leaves the
  model exactly as it was, at the cost of holding both copies.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

from torch import nn

from ..config import Scheme, SmoothQuantConfig, pattern_matches
from ._quant import FLOAT_DTYPES, check_finite, install_sharing_scopes, static_scale
from .experts import W8A8Experts, fused_experts_problem
from .linear import W8A8Linear, check_linear_shape, linear_forward_problem


@dataclass
class PlanEntry:
    name: str
    module: nn.Module
    kind: str                      # "linear" | "experts"
    scheme: Scheme | None = None   # None: stays in floating point
    reason: str | None = None      # why it stays in floating point
    aliases: list[str] = field(default_factory=list)  # other names of the same module (installed there too)
    warn: bool = False             # kept for a reason the user did not choose: warn_kept says so


@dataclass
class ConversionPlan:
    entries: list[PlanEntry] = field(default_factory=list)

    @property
    def converted(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.scheme is not None]

    @property
    def kept(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.scheme is None]


def _is_fused_experts(module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return getattr(gate_up, "dim", lambda: 0)() == 3 and getattr(down, "dim", lambda: 0)() == 3


def candidates(root: nn.Module, prefix: str = ""):
    """``(name, module, kind, aliases)`` for every module W8A8 can replace, plus already-quantized ones (kind
    ``"quantized"``). ``name`` is the module's first name; ``aliases`` its other names (a module registered
    twice, e.g. a shared block)."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        names.setdefault(id(module), []).append(full)
        modules.setdefault(id(module), module)
    for key, module in modules.items():
        first, aliases = names[key][0], list(dict.fromkeys(names[key][1:]))
        if isinstance(module, (W8A8Linear, W8A8Experts)):
            yield first, module, "quantized", aliases
        elif isinstance(module, nn.Linear):
            yield first, module, "linear", aliases
        elif _is_fused_experts(module):
            yield first, module, "experts", aliases


def weight_read_directly(root: nn.Module) -> dict[int, str]:
    """``{id(linear): why}`` for linears whose parent reads their ``.weight`` instead of calling them, so a
    quantized module (an int8 weight) cannot serve it."""
    out = {}
    for module in root.modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj, nn.Linear):
            out[id(module.out_proj)] = ("nn.MultiheadAttention passes out_proj.weight to "
                                        "F.multi_head_attention_forward instead of calling out_proj, which a "
                                        "quantized module cannot serve")
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2"):
                if isinstance(getattr(module, child, None), nn.Linear):
                    out[id(getattr(module, child))] = (
                        f"nn.TransformerEncoderLayer's inference fast path passes {child}.weight to "
                        f"torch._transformer_encoder_layer_fwd instead of calling {child}, which a quantized "
                        f"module cannot serve")
    return out


def family_keep_fp(spec) -> list[tuple[str, str]]:
    """The family's keep-FP patterns as full-name patterns with their reasons."""
    if spec is None:
        return []
    return [(f"{spec.layers}.*.{pattern}", reason) for pattern, reason in spec.keep_fp] + list(spec.keep_fp_modules)


def plan_conversion(root: nn.Module, config: SmoothQuantConfig, stats=None, spec=None,
                    prefix: str = "") -> ConversionPlan:
    """Decide what happens to every candidate module of ``root`` (names prefixed with ``prefix``)."""
    plan = ConversionPlan()
    keep = family_keep_fp(spec)
    direct = weight_read_directly(root)
    missing = []
    found = list(candidates(root, prefix))
    overriding = _rules_aimed_at_keep_fp(config, [n for name, _, _, aliases in found for n in [name] + aliases], keep)
    for name, module, kind, aliases in found:
        if module is root and kind != "quantized":
            raise ValueError(f"the model itself is a {type(module).__name__}: quantize_ replaces submodules in place "
                             f"and cannot replace the object you hold; wrap it (nn.Sequential(module)) or build the "
                             f"quantized module with W8A8Linear.from_linear / W8A8Experts.from_experts")
        if kind == "quantized":
            plan.entries.append(PlanEntry(name, module, kind, None, "already quantized", aliases))
            continue
        resolved = _resolve_all(config, [name] + aliases, module)
        if isinstance(resolved, Scheme):
            for pattern, why in keep:
                if any(fnmatch.fnmatchcase(n, pattern) and not any(pattern_matches(k, n) for k in overriding)
                       for n in [name] + aliases):
                    resolved = f"kept in floating point: {why}"
        warn = False
        if isinstance(resolved, Scheme) and kind == "linear":
            problem = direct.get(id(module)) or linear_forward_problem(module)
            if problem:
                resolved, warn = f"kept in floating point: {problem}", True
        if isinstance(resolved, Scheme):
            problem = (check_linear_shape(module.in_features, module.out_features, "") if kind == "linear"
                       else fused_experts_problem(module))
            if problem:
                resolved, warn = problem, True
        if isinstance(resolved, Scheme) and resolved.activation == "static":
            needed = [name] + ([name + "::down_proj"] if kind == "experts" else [])
            if stats is None or any(n not in stats for n in needed):
                missing.append(name)
        entry = PlanEntry(name, module, kind, resolved if isinstance(resolved, Scheme) else None,
                          None if isinstance(resolved, Scheme) else resolved, aliases, warn)
        plan.entries.append(entry)
    listed = {n for e in plan.entries for n in [e.name] + e.aliases}
    in_layers = keep[:len(spec.keep_fp)] if spec is not None else []  # not keep_fp_modules: a whole vision tower
    for name, module in root.named_modules():  # e.g. MoE routers that are not nn.Linear: still reported
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        for pattern, why in in_layers:
            if full not in listed and fnmatch.fnmatchcase(full, pattern):
                plan.entries.append(PlanEntry(full, module, "other", None, f"kept in floating point: {why}"))
                listed.add(full)
    if missing:
        raise ValueError(f"the static activation scheme needs calibration statistics for {len(missing)} module(s) "
                         f"without them, e.g. {missing[:4]}: pass stats= (collect_act_stats on this model; after "
                         f"smoothing use the statistics smooth_ returns), or choose a dynamic scheme")
    return plan


def _resolve_all(config: SmoothQuantConfig, names: list[str], module) -> Scheme | str:
    """``config.resolve`` for a module known by every name in ``names`` (one name but for shared modules).
    One module is converted once: names whose rules disagree are a ValueError."""
    results = [config.resolve(n, module) for n in names]
    first = results[0]
    for n, r in zip(names[1:], results[1:]):
        if isinstance(r, Scheme) != isinstance(first, Scheme) or (isinstance(r, Scheme) and r != first):
            raise ValueError(f"{names[0]} and {n} are the same module (registered under both names), and the "
                             f"include / exclude / set_local rules treat the names differently ({names[0]}: {first}; "
                             f"{n}: {r}): one module is converted once, so make the rules agree for every name")
    return first


def _rules_aimed_at_keep_fp(config: SmoothQuantConfig, names: list[str], keep) -> list[str]:
    """The set_local scheme rules that override the family's keep-FP list: those aimed at it, whose pattern
    (by name, with the rule of ``pattern_matches``; not a class name) matches only modules the family keeps in
    floating point (``"multi_modal_projector.*"``). A broad rule (``"*"``, ``"*.self_attn.*"``) that also
    matches ordinary modules does not reach into the list: it would quantize a vision tower that text-only
    calibration never runs."""
    aimed = []
    for pattern, value in config.local.items():
        if value == "fp":
            continue
        matched = [n for n in names if pattern_matches(pattern, n)]
        if matched and all(any(fnmatch.fnmatchcase(n, kp) for kp, _ in keep) for n in matched):
            aimed.append(pattern)
    return aimed


def build_module(entry: PlanEntry, stats=None) -> nn.Module:
    """The W8A8 replacement for one planned entry (the source module is not modified)."""
    s = entry.scheme
    if entry.kind == "linear":
        amax = stats.per_tensor_absmax(entry.name) if s.activation == "static" else None
        return W8A8Linear.from_linear(entry.module, s.weight, s.activation, input_amax=amax, name=entry.name)
    amax = down = None
    if s.activation == "static":
        amax, down = stats.per_tensor_absmax(entry.name), stats.expert_down_absmax(entry.name)
    return W8A8Experts.from_experts(entry.module, s.weight, s.activation, input_amax=amax, down_input_amax=down,
                                    name=entry.name)


def check_dtypes(plan: ConversionPlan, what: str) -> None:
    """Refuse (ValueError, nothing changed) planned modules whose weights are not float16, bfloat16 or
    float32: the W8A8 modules take inputs of those dtypes only, so a float64 model would convert and then
    fail in its first forward."""
    def weight(e):
        return ("weight", e.module.weight) if e.kind == "linear" else ("gate_up_proj", e.module.gate_up_proj)

    for e in plan.converted:
        attr, w = weight(e)
        if w.dtype not in FLOAT_DTYPES:
            dtypes = sorted({str(weight(x)[1].dtype) for x in plan.converted})
            raise ValueError(f"{what}: the model's weights are {', '.join(dtypes)} (e.g. {e.name}.{attr}), and W8A8 "
                             f"modules run float16, bfloat16 or float32 inputs only; cast the model first "
                             f"(model.float(), model.to(torch.bfloat16) or model.half())")


def check_sources(plan: ConversionPlan, stats=None) -> None:
    """Refuse (ValueError, nothing changed) what ``build_module`` would refuse for any planned entry, so a
    conversion that swaps module by module cannot stop half-way on bad input: non-finite weights or
    biases, non-finite or negative static statistics. Reads every weight once; allocates one bool mask
    of one tensor at a time."""
    for e in plan.converted:
        if e.kind == "linear":
            tensors = [("weight", e.module.weight)] + ([("bias", e.module.bias)] if e.module.bias is not None else [])
        else:
            tensors = [("gate_up_proj", e.module.gate_up_proj), ("down_proj", e.module.down_proj)]
        for what, t in tensors:
            for i, part in enumerate(t if t.dim() > 2 else [t]):  # expert by expert: small masks
                check_finite(part, f"{e.name}.{what}" + (f"[{i}]" if t.dim() > 2 else ""))
        if e.scheme.activation == "static":
            static_scale(stats.per_tensor_absmax(e.name), f"{e.name} input_amax")
            if e.kind == "experts":
                down = static_scale(stats.expert_down_absmax(e.name), f"{e.name} down_input_amax")
                if down.numel() != e.module.gate_up_proj.shape[0]:
                    raise ValueError(f"{e.name}: down_input_amax must have {e.module.gate_up_proj.shape[0]} "
                                     f"elements (one per expert), got {down.numel()}")


class PartialConversionError(RuntimeError):
    """``convert_in_place`` stopped after converting some modules. ``converted``: their names (now W8A8);
    ``remaining``: the planned modules still in floating point (unchanged)."""

    def __init__(self, message: str, converted: list[str], remaining: list[str]):
        super().__init__(message)
        self.converted, self.remaining = converted, remaining


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def carry_over_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward hooks and pre-hooks registered on ``old`` (with_kwargs and always_call ones
    included). The dicts themselves move, so the handles the user holds still remove them."""
    if any(getattr(old, attr, None) for attr in _HOOK_DICTS):
        for attr in _HOOK_DICTS:
            if hasattr(old, attr):
                setattr(new, attr, getattr(old, attr))


def _install(root: nn.Module, name: str, module: nn.Module, prefix: str) -> None:
    rel = name[len(prefix) + 1:] if prefix else name
    parent_name, _, child = rel.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child, None)
    if isinstance(old, nn.Module) and old is not module:
        carry_over_hooks(old, module)
    setattr(parent, child, module)
    if isinstance(module, W8A8Linear):  # a call of the parent (self_attn, mlp) may share one quantized input
        install_sharing_scopes([parent])


def install_entry(root: nn.Module, entry: PlanEntry, module: nn.Module, prefix: str = "") -> None:
    """Install ``module`` at the entry's name and at each of its aliases."""
    for name in [entry.name] + entry.aliases:
        _install(root, name, module, prefix)


def _listed(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def convert_in_place(root: nn.Module, plan: ConversionPlan, stats=None, progress: bool = False,
                     desc: str = "quantizing", prefix: str = "") -> list[str]:
    """Build and install the planned modules one at a time; returns their names in order.

    Each entry's reference to its floating-point module is dropped once the W8A8 one is installed, so
    that module is freed (unless the caller holds it elsewhere) before the next is built. Run
    ``check_sources`` first. A failure raises ``PartialConversionError`` (an interrupt gets the same
    account as a note) and leaves every module either converted or untouched."""
    entries = plan.converted
    done: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(entries), desc=desc, unit="module")
    try:
        for e in entries:
            module = build_module(e, stats)
            install_entry(root, e, module, prefix)
            e.module = module  # the plan no longer holds the floating-point original
            done.append(e.name)
            if bar is not None:
                bar.update()
    except BaseException as exc:
        remaining = [e.name for e in entries[len(done):]]
        stopped = remaining[0] if remaining else "the end"
        account = (f"converted {len(done)} of {len(entries)} module(s) before stopping at {stopped!r}"
                   + (f" ({_listed(done)})" if done else "") + "; every module is either W8A8 or untouched "
                   "floating point, so the model still runs, and calling quantize_ again converts the remaining "
                   f"{len(remaining)} (already converted ones are kept)")
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: keep their type
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(account)
            else:
                warnings.warn(account, RuntimeWarning, stacklevel=2)
            raise
        raise PartialConversionError(f"{type(exc).__name__}: {exc}\n({account})", done, remaining) from exc
    finally:
        if bar is not None:
            bar.close()
    return done


def build_modules(plan: ConversionPlan, stats=None, progress: bool = False,
                  desc: str = "quantizing") -> dict[str, nn.Module]:
    """``{name: W8A8 module}`` for every planned entry, its aliases mapped to the same module."""
    entries = plan.converted
    if progress:
        from tqdm.auto import tqdm
        entries = tqdm(entries, desc=desc, unit="module")
    out = {}
    for e in entries:
        module = build_module(e, stats)
        out.update({name: module for name in [e.name] + e.aliases})
    return out


def swap_modules(root: nn.Module, new_modules: dict[str, nn.Module], prefix: str = "") -> list[str]:
    """Install ``new_modules`` (full names, ``prefix`` stripped to address ``root``); returns the names
    swapped, in order. On failure the exception says which were already swapped."""
    done = []
    try:
        for name, module in new_modules.items():
            _install(root, name, module, prefix)
            done.append(name)
    except Exception as exc:
        raise RuntimeError(f"swapping in the W8A8 modules failed at {name!r} after {len(done)} of "
                           f"{len(new_modules)} were installed ({done[:8]}{'...' if len(done) > 8 else ''}): "
                           f"{exc}") from exc
    return done


def warn_kept(plan: ConversionPlan) -> None:
    """Warn about every module left in floating point for a reason other than the user's own choice."""
    unaligned = [e for e in plan.kept if e.warn]
    if unaligned:
        groups: dict[str, list[str]] = {}
        for e in unaligned:
            groups.setdefault(e.reason, []).append(e.name)
        listed = "; ".join(f"{why}: {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
                           for why, names in groups.items())
        warnings.warn(f"{len(unaligned)} module(s) stay in floating point because the W8A8 modules cannot serve them "
                      f"({listed})", stacklevel=3)
