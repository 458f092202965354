"""``family="auto"``: a smoothing table inferred from the model itself, for architectures without one.

1. **Decoder layers**: the ``nn.ModuleList`` of same-class modules holding the most parameters.
2. **Who feeds whom**: one forward on a few fixed token ids, with the decoder layers walked one at a time
   (``sq_kernels.layerwise``, so each layer gets its own arguments). In each layer, a norm-like module
   (a leaf with a 1-D ``weight`` of the hidden size) feeds a module when that module is called on the
   norm's very output (the same memory: a view such as ``reshape(-1, H)`` counts). Its consumers must all
   be ones smoothing can compensate: ``nn.Linear``, fused MoE experts, or a router with a 2-D ``weight``
   ``[E, H]``; containers (``self_attn``, ``mlp``) are looked through. A norm read by anything else
   (an elementwise module, a residual stream kept as a module input) is not smoothed, and said so.
3. **The norm's form**: ``weight * x̂ (+ bias)`` or ``(1 + weight) * x̂`` (Gemma), told apart by running a
   copy of the norm with its weight set to 1 and to 2.
4. **Proof**: for every layer, a copy is smoothed with random scales in [0.5, 2] and must give the same
   output as the layer on the recorded input (the layer's own contribution, output minus input, within
   1e-4 relative in float32, 2e-2 in 16-bit, so the residual stream cannot hide a change); a group that
   breaks this is dropped, with the reason.
5. **Linear pairs** (only with ``fold_linear_pairs=True``: ``infer_family(model, pairs=True)``; not in a layer
   with more than ``MAX_PAIR_LINEARS`` linears): every pair of linears ``a`` then ``b`` in a layer where
   ``a``'s output width is ``b``'s input width is folded the same way (``a``'s output rows / s, ``b``'s
   input columns * s); those that keep the layer's output are pairs (v -> o without grouped KV heads,
   up -> down through a gated MLP, fc1 -> fc2 through a ReLU). A pair that fails in one layer is not tried
   in later ones.

The result is a ``FamilySpec`` named ``auto (ClassName)`` with alpha 0.5 (the paper's default; use
alpha="auto" to search) and no modules kept in floating point beyond the usual rules (routers that are
``nn.Linear`` are converted like any linear unless excluded). Inferring costs a forward on 16 tokens and,
per layer, one smoothed copy of that layer per group and per pair still in the running (about a dozen
candidates in the first layer of a Llama, two in the others).
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from . import FamilySpec, SmoothGroup, language_model_root, outside_language_model

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[bool, FamilySpec]]" = weakref.WeakKeyDictionary()
_PROVEN: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()  # (id(spec), pairs) proven
MAX_PAIR_LINEARS = 16  # a layer with more nn.Linear modules (MoE experts as modules) gets no pair inference
PROBE_TOKENS = 16


def find_layers(model: nn.Module) -> str:
    """Dotted path of the decoder layers: the ``ModuleList`` of same-class modules with the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ValueError(f"family='auto': {type(model).__name__} has no ModuleList of decoder layers")
    return best


def _is_norm(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and not list(module.children()) and isinstance(weight, nn.Parameter)
            and weight.dim() == 1 and weight.shape[0] == width)


def _target_kind(module: nn.Module, width: int) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear" if module.in_features == width else None
    gate_up = getattr(module, "gate_up_proj", None)
    if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and gate_up.shape[-1] == width:
        return "experts"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == width:
        return "router"
    return None


def _key(t) -> tuple | None:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
        return (t.data_ptr(), t.numel(), t.shape[-1])
    return None


def _first_tensor(args, kwargs):
    for v in list(args) + [kwargs.get("hidden_states")] + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


@torch.no_grad()
def _norm_offset(norm: nn.Module, width: int, device) -> float | None:
    """0 for ``weight * x̂ (+ bias)``, 1 for ``(1 + weight) * x̂``, None for anything else."""
    probe = copy.deepcopy(norm).to(device=device, dtype=torch.float32)
    if isinstance(getattr(probe, "bias", None), torch.Tensor):
        probe.bias.zero_()
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)).to(device)
    probe.weight.fill_(1.0)
    y1 = probe(x).float()
    probe.weight.fill_(2.0)
    y2 = probe(x).float()
    probe.weight[: width // 2] = 1.0  # per channel: each half follows its own weight
    y3 = probe(x).float()
    if not (torch.isfinite(y1).all() and y1.abs().sum() > 0):
        return None
    for offset in (0.0, 1.0):
        ratio = (2.0 + offset) / (1.0 + offset)
        if torch.allclose(y2, y1 * ratio, rtol=1e-4, atol=1e-6) and \
                torch.allclose(y3[:, : width // 2], y1[:, : width // 2], rtol=1e-4, atol=1e-6) and \
                torch.allclose(y3[:, width // 2:], y2[:, width // 2:], rtol=1e-4, atol=1e-6):
            if offset and isinstance(getattr(norm, "bias", None), torch.Tensor):
                return None
            return offset
    return None


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _groups_of_layer(layer: nn.Module, call, width: int, notes: list[str], lname: str) -> list[SmoothGroup]:
    """The norm -> consumers groups of one layer, from one call ``(args, kwargs)``."""
    outputs, consumers, hooks, alive = {}, {}, [], []
    norms = {n: m for n, m in layer.named_modules() if _is_norm(m, width)}

    def on_output(name):
        def hook(module, args, out):
            key = _key(out if isinstance(out, torch.Tensor) else None)
            if key is not None:
                alive.append(out)  # every recorded tensor is held until the call ends: no address is reused
                outputs.setdefault(key, name)
        return hook

    def on_input(name):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            key = _key(x)
            if key is not None:
                alive.append(x)
                consumers.setdefault(key, []).append(name)
        return hook
    try:
        for n, m in norms.items():
            hooks.append(m.register_forward_hook(on_output(n)))
        for n, m in layer.named_modules():
            if n:
                hooks.append(m.register_forward_pre_hook(on_input(n), with_kwargs=True))
        layer(*call[0], **call[1])
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for key, source in outputs.items():
        readers = consumers.get(key, [])
        leaves = [r for r in readers if not any(o.startswith(r + ".") for o in readers)]
        if not leaves:
            continue
        bad = [r for r in leaves if _target_kind(layer.get_submodule(r), width) is None]
        if bad:
            module = layer.get_submodule(bad[0])
            notes.append(f"{lname}.{source}: also read by {bad[0]} ({type(module).__name__}), which smoothing cannot "
                         f"compensate")
            continue
        offset = _norm_offset(norms[source], width, next(layer.parameters()).device)
        if offset is None:
            notes.append(f"{lname}.{source} ({type(norms[source]).__name__}): not of the form weight * x (+ bias) "
                         f"or (1 + weight) * x")
            continue
        groups.append(SmoothGroup(source, tuple(leaves), weight_offset=offset))
    return groups


def _check_group(layer, lname, group: SmoothGroup, call, expected) -> float:
    """Relative output error of a copy of ``layer`` with ``group`` smoothed by random scales, on ``call``."""
    from ..layerwise import hidden_out
    from ..smooth import GroupPlan, fold_, input_weight
    trial = copy.deepcopy(layer)
    width = input_weight(trial.get_submodule(group.targets[0]), group.targets[0]).shape[-1]
    s = torch.empty(width).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
    plan = GroupPlan(lname, group.source, group.kind, group.targets, torch.ones(width), torch.ones(width),
                     group.weight_offset)
    fold_(trial, plan, s)
    out = hidden_out(trial(*call[0], **call[1]))
    x = _first_tensor(*call)
    if isinstance(x, torch.Tensor) and x.shape == out.shape == expected.shape:
        # the layer's own contribution: the residual it adds back would hide a change in a deep layer
        return _relative_error(out - x, expected - x)
    return _relative_error(out, expected)


def _pair_candidates(layer: nn.Module, call) -> list[tuple[str, str]]:
    """``(a, b)`` for linears of ``layer`` called in this order in one call where ``a``'s output width is
    ``b``'s input width: the pairs whose smoothing (``a``'s output rows / s, ``b``'s input columns * s) may be
    neutral. Which are is decided by folding (``_check_group``)."""
    order, hooks = [], []
    linears = {n: m for n, m in layer.named_modules() if n and isinstance(m, nn.Linear)}
    try:
        for n, m in linears.items():
            hooks.append(m.register_forward_pre_hook(lambda module, args, n=n: order.append(n)))
        layer(*call[0], **call[1])
    finally:
        for h in hooks:
            h.remove()
    called = list(dict.fromkeys(order))
    return [(a, b) for i, a in enumerate(called) for b in called[i + 1:]
            if linears[a].out_features == linears[b].in_features]


def _tolerance(model: nn.Module) -> float:
    """How far a neutral fold may move a layer's own contribution: float rounding of the model's dtype."""
    return 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2


def _walk_probe(model: nn.Module, layers, visit) -> None:
    """Run ``model`` in eval mode on ``PROBE_TOKENS`` fixed random token ids, calling
    ``visit(name, layer, inputs, outputs)`` for each decoder layer of ``layers`` (``LayerwiseRun.walk``)."""
    from ..calibration import eval_mode, model_device, run_model
    from ..layerwise import LayerwiseRun
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config  # a multimodal model: its language model's config
    vocab = int(getattr(text, "vocab_size", 2) or 2)
    tokens = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), eval_mode(model):
        with LayerwiseRun(model, layers, [tokens], model_device(model), run_model) as run:
            run.walk(visit)


def infer_family(model: nn.Module, pairs: bool = False) -> FamilySpec:
    """The smoothing table of ``model`` inferred as the module docstring says (cached per model object);
    ``pairs``: infer its linear pairs too (for ``fold_linear_pairs=True``; otherwise none are looked for)."""
    cached = _CACHE.get(model, {})
    if pairs in cached:
        return cached[pairs]
    from ..calibration import check_in_memory
    check_in_memory(model, "family='auto'")
    path = find_layers(model)
    root = language_model_root(model, path)
    layers = [(f"{path}.{i}", layer) for i, layer in enumerate(model.get_submodule(path))]
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config  # a multimodal model: its language model's config
    width = getattr(text, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"family='auto': {type(model).__name__} has no config.hidden_size")
    tolerance = _tolerance(model)
    per_layer: dict[str, list[SmoothGroup]] = {}
    pairs_per_layer: dict[str, list[SmoothGroup]] = {}
    pair_verdict: dict[tuple[str, str], bool] = {}  # a pair that failed once is not tried again
    notes: list[str] = []

    def visit(lname, layer, inputs, outputs):
        groups = _groups_of_layer(layer, inputs[0], width, notes, lname)
        kept = []
        for group in groups:
            err = _check_group(layer, lname, group, inputs[0], outputs[0])
            if err <= tolerance:
                kept.append(group)
            else:
                notes.append(f"{lname}.{group.source} -> {', '.join(group.targets)}: smoothing it changed the layer's "
                             f"output by {err:.1e} (relative), so it is not smoothed")
        per_layer[lname] = kept
        found = []
        linears = sum(isinstance(m, nn.Linear) for m in layer.modules())
        if pairs and linears > MAX_PAIR_LINEARS:
            notes.append(f"{lname}: {linears} linears (experts as separate modules?): linear pairs not inferred")
        elif pairs:
            for a, b in _pair_candidates(layer, inputs[0]):
                if pair_verdict.get((a, b), True):
                    pair = SmoothGroup(a, (b,), kind="linear")
                    pair_verdict[(a, b)] = _check_group(layer, lname, pair, inputs[0], outputs[0]) <= tolerance
                    if pair_verdict[(a, b)]:
                        found.append(pair)
        pairs_per_layer[lname] = found

    _walk_probe(model, layers, visit)
    signatures: dict[tuple, list[str]] = {}
    for lname, groups in per_layer.items():
        for g in groups:
            signatures.setdefault((g.source, g.targets, g.weight_offset), []).append(lname)
    if not signatures:
        raise ValueError(f"family='auto': found no norm feeding linears in {type(model).__name__}'s decoder layers "
                         f"({path}) that can be smoothed" + (f": {notes[0]}" if notes else "") +
                         "; quantize without smoothing (smooth=False) or pass a FamilySpec")
    layer_ids = {name: id(layer) for name, layer in layers}

    def table(signatures, kind):
        out = []
        for (source, targets, offset), where in signatures.items():
            if len(where) == len(layers):
                out.append(SmoothGroup(source, targets, kind=kind, weight_offset=offset))
            else:
                ids = frozenset(layer_ids[w] for w in where)
                out.append(SmoothGroup(source, targets, kind=kind, weight_offset=offset,
                                       in_layer=lambda layer, ids=ids: id(layer) in ids,
                                       note=f"in {len(where)} of {len(layers)} layers"))
        return tuple(out)

    pair_signatures: dict[tuple, list[str]] = {}
    for lname, found in pairs_per_layer.items():
        for g in found:
            pair_signatures.setdefault((g.source, g.targets, 0.0), []).append(lname)
    groups = table(signatures, "norm")
    spec = FamilySpec(name=f"auto ({type(model).__name__})",
                      model_types=(getattr(config, "model_type", None) or type(model).__name__,),
                      layers=path, groups=groups, linear_pairs=table(pair_signatures, "linear"), default_alpha=0.5,
                      keep_fp_modules=outside_language_model(model, root) if root else (),
                      description="inferred from the model: " + ("; ".join(dict.fromkeys(notes))
                                                                 or "every norm feeding linears is smoothed"),
                      extra={"notes": list(dict.fromkeys(notes))})
    _CACHE.setdefault(model, {})[pairs] = spec
    return spec


def prove_table(model: nn.Module, spec: FamilySpec, fold_linear_pairs: bool = False) -> None:
    """Check a user's table on ``model`` before it is trusted: every group is folded with random scales into a
    copy of the first decoder layer it applies to, and the layer's output on a short random prompt must not
    change (float rounding aside). A group that leaves out one of its source's readers fails this: smoothing it
    would change the model. Raises a ValueError naming the group and the error."""
    from . import decoder_layers
    if (id(spec), fold_linear_pairs) in _PROVEN.get(model, ()):  # smoothquant proves before calibrating
        return
    layers = decoder_layers(model, spec)
    config = getattr(model, "config", None)
    groups = spec.active_groups(config, fold_linear_pairs)
    if not layers or not groups:
        return
    tolerance = _tolerance(model)
    todo = {(g.source, g.targets): g for g in groups}
    failures: list[str] = []

    def visit(lname, layer, inputs, outputs):
        if not todo:  # everything proven: the rest of the walk only passes the hidden states on
            return
        for key, group in list(todo.items()):
            if not group.present(layer):
                continue
            del todo[key]
            err = _check_group(layer, lname, group, inputs[0], outputs[0])
            if not err <= tolerance:
                failures.append(f"{lname}.{group.source} -> {', '.join(group.targets)} changed the layer's output by "
                                f"{err:.1e} (relative)")

    _walk_probe(model, layers, visit)
    if not failures:
        _PROVEN.setdefault(model, set()).add((id(spec), fold_linear_pairs))
    if failures:
        raise ValueError(f"family table {spec.name!r}: smoothing is not neutral for {len(failures)} group(s): "
                         f"{'; '.join(failures[:3])}. A group must list every module that reads its source's output "
                         f"(and the source must compute weight * x (+ bias)); compare with family='auto', which "
                         f"infers the table from the model")


__all__ = ["infer_family", "find_layers", "prove_table"]
