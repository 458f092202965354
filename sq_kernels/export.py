"""Export a W8A8 model as a ``compressed-tensors`` checkpoint (format ``int-quantized``), the layout
llm-compressor writes and vLLM serves on its INT8 W8A8 path.

The directory holds ``config.json`` with a ``quantization_config`` (``quant_method: compressed-tensors``),
``model.safetensors`` with the usual HF tensor names, and ``generation_config.json``. Each W8A8 linear
``name`` becomes::

    name.weight        int8 [N, K]          (the nn.Linear layout)
    name.weight_scale  float32 [N, 1]       per channel ("strategy": "channel"), or [1] per tensor ("tensor")
    name.input_scale   float32 [1]          static activations only ("strategy": "tensor", "dynamic": false)
    name.bias          float32 [N]          when the linear has one (loaders cast it to the model's dtype)

Per-token dynamic activations are ``"strategy": "token", "dynamic": true``. Linears kept in floating point
are listed in ``ignore``. The smoothing is already folded into the norms and weights, so it needs no entry.

What cannot be expressed is refused with the reason: per-tensor *dynamic* activations (vLLM's INT8 path
takes per-token dynamic or per-tensor static), fused MoE experts, and a mix of schemes across linears.
The file layout follows vLLM's ``CompressedTensorsW8A8Int8`` scheme; vLLM itself is not installed here, so
the tests check the layout and that dequantizing it gives back this model's weights and scales exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (DEFAULT_SHARD_SIZE, CheckpointError, _all_tensors, _check_savable, _check_scales,
                         _kept_float32, _module_table, _nbytes, cast_floats_,
                         check_device, check_float_dtype, finish_loading, model_class, parse_size, plan_shards,
                         skeleton, stored_float_dtype, unwrap_compiled, write_shards)
from .nn import W8A8Experts, W8A8Linear

WEIGHTS = {"per_channel": "channel", "per_tensor": "tensor"}
ACTIVATIONS = {"per_token": ("token", True), "static": ("tensor", False)}


def _args(strategy: str, dynamic: bool, observer: str) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": observer,
            "observer_kwargs": {}}


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for ``model`` (its W8A8 linears and the linears it
    keeps in floating point); a ValueError names what compressed-tensors cannot express."""
    experts = [n for n, m in model.named_modules() if isinstance(m, W8A8Experts)
               or getattr(getattr(m, "gate_up_proj", None), "dim", lambda: 0)() == 3]
    if experts:  # transformers 5 keeps experts fused in memory and converts their names when it saves
        raise ValueError(f"export: MoE experts ({experts[0]}, ...) have no compressed-tensors layout here "
                         f"(quantized or not): mixture-of-experts models cannot be exported yet")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    if not linears:
        raise ValueError("export: the model has no W8A8 linears; quantize it first")
    if any(n == "lm_head" or n.endswith(".lm_head") for n in linears):
        raise ValueError("export: lm_head is quantized, and vLLM keeps the output head in floating point (it has "
                         "no quantized head to load it into): quantize with lm_head excluded (the default)")
    fp = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        for name in linears:
            parent, _, child = name.rpartition(".")
            if child in fused:
                kept = [f"{parent}.{c}" for c in fused if f"{parent}.{c}" in fp]
                if kept:
                    raise ValueError(f"export: vLLM fuses {', '.join(fused)} into one layer, which needs one scheme, "
                                     f"but {name} is quantized and {kept[0]} is kept in floating point: keep all of "
                                     f"them or none")
    schemes = {(m.weight_granularity, m.activation) for m in linears.values()}
    if len(schemes) > 1:
        raise ValueError(f"export: the linears use {len(schemes)} different schemes {sorted(schemes)}; the export "
                         f"writes one config group, so quantize with one scheme")
    weight, activation = schemes.pop()
    if activation not in ACTIVATIONS:
        raise ValueError(f"export: activation={activation!r} (per-tensor dynamic) has no kernel on vLLM's INT8 path, "
                         f"which takes per-token dynamic or per-tensor static activations (schemes W8A8, O1, O3)")
    strategy, dynamic = ACTIVATIONS[activation]
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))  # FalconLinear too
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": _args(WEIGHTS[weight], False, "minmax"),
            "input_activations": _args(strategy, dynamic, "memoryless" if dynamic else "minmax"),
            "output_activations": None,
        }},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def export_compressed_tensors(model: nn.Module, path, tokenizer=None, *, max_shard_size=DEFAULT_SHARD_SIZE,
                              progress: bool = True) -> Path:
    """Write the W8A8 ``model`` (from ``smoothquant`` / ``quantize_`` or ``load_quantized``) to the new or
    empty directory ``path`` as a compressed-tensors checkpoint, with ``tokenizer`` when given (``vllm serve``
    needs one in the directory). Above ``max_shard_size`` (bytes, or ``"5GB"``, ``"2GiB"``...) the weights
    are split into ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``, as
    ``save_pretrained`` writes them. Returns the path."""
    limit = parse_size(max_shard_size)
    model = unwrap_compiled(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"export needs a Hugging Face model with a config, got {type(model).__name__}")
    qconfig = quantization_config(model)
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise ValueError(f"export: {path} is a file or a directory that is not empty; choose a new directory")
    tensors, _aliases, non_persistent, own_copy = _all_tensors(model)  # tied weights stored once, as HF does
    for key in non_persistent:  # rotary tables and the like: rebuilt by the model, not part of a checkpoint
        tensors.pop(key, None)
    _check_savable(model, tensors, "export")
    _check_scales(tensors, _module_table(model), "export")  # a NaN, Inf or zero scale would be served as is
    dtype = stored_float_dtype(model) or torch.float16
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            if m.weight_granularity == "per_channel":
                tensors[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"].reshape(-1, 1).contiguous()
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        _write_export(model, config, qconfig, tensors, own_copy, dtype, path, tokenizer, limit, progress)
    except BaseException:  # the directory was new or empty: what is in it now is this export's, half-written
        for f in path.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        if created:
            path.rmdir()
        raise
    return path


def _write_export(model, config, qconfig, tensors, own_copy, dtype, path: Path, tokenizer, limit, progress) -> None:
    exported = json.loads(config.to_json_string())
    exported["architectures"] = [type(model).__name__]
    exported["dtype"] = exported["torch_dtype"] = str(dtype).removeprefix("torch.")  # transformers 5 / 4
    exported["quantization_config"] = qconfig
    sizes = {k: _nbytes(t) for k, t in tensors.items()}
    written = write_shards(tensors, path, plan_shards(sizes, limit), "model.safetensors",
                           "model-{:05d}-of-{:05d}.safetensors", {"format": "pt"}, own_copy, progress=progress)
    if len(written) > 1:
        weight_map = {key: name for name, keys in written for key in keys}
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    # config.json last: until it is there, the directory is not a model anything would load
    (path / "config.json").write_text(json.dumps(exported, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _ignored(name: str, ignore) -> bool:
    """compressed-tensors' rule: an exact name, or ``re:PATTERN`` matched at the start of the name (re.match)."""
    import re
    return any(re.match(p[3:], name) if p.startswith("re:") else name == p for p in ignore)


def _scheme_of(group: dict, where: str) -> tuple[str, str]:
    """``(weight, activation)`` of a config group, or a CheckpointError naming what is not W8A8 INT8 here."""
    w, a = group.get("weights") or {}, group.get("input_activations") or {}
    for what, args in (("weights", w), ("input_activations", a)):
        if args.get("num_bits") != 8 or args.get("type") != "int" or not args.get("symmetric", False):
            raise CheckpointError(f"{where}: {what} are not symmetric 8-bit integers ({args}); sq_kernels runs "
                                  f"symmetric INT8 W8A8 only")
    weight = {v: k for k, v in WEIGHTS.items()}.get(w.get("strategy"))
    activation = {v: k for k, v in ACTIVATIONS.items()}.get((a.get("strategy"), bool(a.get("dynamic"))))
    if weight is None or activation is None or w.get("dynamic"):
        raise CheckpointError(f"{where}: weights {w.get('strategy')!r} / activations {a.get('strategy')!r} "
                              f"(dynamic={a.get('dynamic')}) is not a scheme sq_kernels runs (weights channel or "
                              f"tensor; activations token-dynamic or tensor-static)")
    return weight, activation


def load_compressed_tensors(path, device=None, dtype=None) -> nn.Module:
    """Load a compressed-tensors INT8 W8A8 checkpoint (``format: int-quantized``, as written by
    ``export_compressed_tensors`` or llm-compressor's W8A8 INT8 schemes) into its HF class with
    ``W8A8Linear`` modules, so it runs on the sq_kernels ops. One config group targeting ``Linear``, symmetric
    INT8 weights (channel / tensor) and activations (token-dynamic / tensor-static); anything else is a
    ``CheckpointError`` naming it. ``dtype``: as for ``load_quantized`` (the floating-point rest; scales and
    biases stay float32)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig
    path = Path(path)
    device = check_device(device)
    dtype = check_float_dtype(dtype)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not JSON text: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, got {type(raw).__name__}")
    q = raw.get("quantization_config") or {}
    if not isinstance(q, dict):
        raise CheckpointError(f"{config_file}: quantization_config must be an object, got {q!r}")
    if q.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{path}: config.json has no compressed-tensors quantization_config "
                              f"(quant_method={q.get('quant_method')!r})")
    if q.get("format") != "int-quantized":
        raise CheckpointError(f"{path}: format {q.get('format')!r}; sq_kernels reads 'int-quantized' (int8 tensors "
                              f"stored as they are)")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise CheckpointError(f"{config_file}: config_groups must map group names to objects, got {groups!r}")
    if len(groups) != 1 or list(groups.values())[0].get("targets") != ["Linear"]:
        raise CheckpointError(f"{path}: {len(groups)} config groups with targets "
                              f"{[g.get('targets') for g in groups.values()]}; sq_kernels reads one group targeting "
                              f"['Linear']")
    weight, activation = _scheme_of(list(groups.values())[0], str(config_file))
    ignore = q.get("ignore") or []
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is built from the plain config; the W8A8 modules go in below
    cls = model_class((config.architectures or [None])[0], f"the 'architectures' field of {config_file}")
    index = path / "model.safetensors.index.json"
    if index.is_file():  # the shards the index names, and only those (a stale model.safetensors is not read)
        try:
            files = sorted({path / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
    else:
        files = [path / "model.safetensors"]
    missing_files = [f.name for f in files if not f.is_file()]
    if missing_files:
        raise CheckpointError(f"{path}: weight files missing: {missing_files[:4]}")
    model = skeleton(cls, config, device)  # parameters on meta; buffers (rotary tables...) built for real
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not _ignored(name, ignore):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    W8A8Linear(m.in_features, m.out_features, m.bias is not None, weight, activation, device="meta"))
    state, origin = {}, {}
    for f in files:
        shard = load_file(str(f), device=str(device))
        twice = [k for k in shard if k in origin]
        if twice:
            raise CheckpointError(f"{twice[0]} is stored twice, in {origin[twice[0]]} and {f.name}")
        origin.update(dict.fromkeys(shard, f.name))
        state.update(shard)
    for name, m in model.named_modules():
        if not isinstance(m, W8A8Linear):
            continue
        for zp in (f"{name}.weight_zero_point", f"{name}.input_zero_point"):  # written by some versions
            if zp in state:
                if bool(state[zp].any()):
                    raise CheckpointError(f"{zp} is not zero: asymmetric quantization, which sq_kernels does not run")
                del state[zp]
        w = state.get(f"{name}.weight")
        if w is not None and w.dtype != torch.int8:
            raise CheckpointError(f"{name}.weight is {w.dtype}, expected int8 (the config says it is quantized)")
        for key in (f"{name}.weight_scale", f"{name}.input_scale", f"{name}.bias"):
            if key in state:
                if not state[key].is_floating_point():
                    raise CheckpointError(f"{key} is {state[key].dtype}, expected a floating-point tensor")
                state[key] = state[key].reshape(-1).to(torch.float32).contiguous()
        for key in (f"{name}.weight_scale", f"{name}.input_scale"):
            t = state.get(key)
            if t is not None and (not torch.isfinite(t).all() or (t <= 0).any()):
                raise CheckpointError(f"{key} holds NaN, Inf or non-positive scales")
    if dtype is not None:
        cast_floats_(state, dtype, _kept_float32(model))
    expected = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in expected \
        and "lm_head.weight" not in state
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not match {cls.__name__} with W8A8 linears: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}")
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{key}: stored shape {tuple(t.shape)}, the model expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return finish_loading(model, path, dtype, path)


__all__ = ["export_compressed_tensors", "load_compressed_tensors", "quantization_config"]
