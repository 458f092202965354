"""Quantized checkpoints: save a W8A8 model and load it back into its HF class, never materialising the
floating-point weights of the quantized linears.

A checkpoint directory holds::

    config.json             the HF config (unchanged format; ``architectures`` names the class)
    generation_config.json  when the model has one
    sq_model.safetensors    every tensor of the quantized model: int8 weights, float32 scales and
                            biases, the floating-point rest (embeddings, norms, lm_head) and the
                            non-persistent buffers (rotary tables), so a reload is bitwise identical;
                            above ``max_shard_size`` (5 GB) split into sq_model-00001-of-0000N.safetensors
                            (format version 2; a single file stays version 1, readable by older releases)
    sq_quantization.json    the versioned quantization config: format and version, the W8A8 module
                            table (kind, shape, scheme), tied-weight aliases, SHA-256 of config.json
                            and of every weights file, and the SmoothQuant settings (alpha per layer)

The weights file deliberately is not ``model.safetensors``: a plain ``from_pretrained`` cannot load
int8 weights into floating-point layers, so it fails instead of returning a broken model.
``load_quantized`` builds the model on the meta device, swaps in W8A8 modules from the table, and
assigns the stored tensors; a checkpoint whose files do not match each other, whose version is unknown
or whose bytes are damaged is rejected with a message saying which.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath

import torch
from torch import nn

from .config import ACTIVATION_SCHEMES, WEIGHT_GRANULARITIES
from .nn import W8A8Experts, W8A8Linear
from .nn._quant import FLOAT_DTYPES, KeepBufferDtypes, install_sharing_scopes

FORMAT = "sq_kernels.w8a8"
FORMAT_VERSION = 2  # the newest this release reads and writes; 1: one weights file, 2: shards
QUANT_FILE = "sq_quantization.json"
WEIGHTS_FILE = "sq_model.safetensors"
SHARD_FILE = "sq_model-{:05d}-of-{:05d}.safetensors"
DEFAULT_SHARD_SIZE = "5GB"  # as transformers' save_pretrained; the Hugging Face Hub refuses files over 50 GB
SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
              "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
# Key of the weights file's safetensors metadata holding the SHA-256 of the quantization table (see
# _table_digest). Checkpoints written before it existed lack it and still load.
TABLE_DIGEST_KEY = "quantization_table_sha256"
# The fields of sq_quantization.json that decide what load_quantized builds (and so the model's math);
# "quantization" (the SmoothQuant settings, alpha per layer) only records how the weights were made.
TABLE_FIELDS = ("architecture", "model_type", "config_sha256", "modules", "tied", "non_persistent_buffers")
# Required fields of one module entry of the table, by kind, with their JSON types.
MODULE_FIELDS = {
    "linear": {"in_features": int, "out_features": int, "bias": bool, "weight": str, "activation": str},
    "experts": {"num_experts": int, "hidden_dim": int, "intermediate_dim": int, "weight": str, "activation": str},
}


class CheckpointError(ValueError):
    """A checkpoint that is not one, is damaged, or does not match itself."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _config_digest(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _table_digest(meta: dict) -> str:
    """SHA-256 of the canonical JSON of ``meta``'s TABLE_FIELDS (key order and whitespace do not matter)."""
    table = {key: meta.get(key) for key in TABLE_FIELDS}
    return hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _module_table(model: nn.Module) -> dict[str, dict]:
    table = {}
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            table[name] = {"kind": "linear", "in_features": m.in_features, "out_features": m.out_features,
                           "bias": m.bias is not None, "weight": m.weight_granularity, "activation": m.activation}
        elif isinstance(m, W8A8Experts):
            table[name] = {"kind": "experts", "num_experts": m.num_experts, "hidden_dim": m.hidden_dim,
                           "intermediate_dim": m.intermediate_dim, "weight": m.weight_granularity,
                           "activation": m.activation}
    return table


def _scale_names(table: dict[str, dict]) -> list[str]:
    names = []
    for name, d in table.items():
        if d["kind"] == "linear":
            names += [f"{name}.weight_scale"] + ([f"{name}.input_scale"] if d["activation"] == "static" else [])
        else:
            names += [f"{name}.gate_up_proj_scale", f"{name}.down_proj_scale"]
            if d["activation"] == "static":
                names += [f"{name}.gate_up_input_scale", f"{name}.down_input_scale"]
    return names


def _check_scales(tensors: dict[str, torch.Tensor], table: dict[str, dict], where: str) -> None:
    for key in _scale_names(table):
        t = tensors.get(key)
        if t is None:
            raise CheckpointError(f"{where}: scale {key!r} is missing")
        if t.dtype != torch.float32:
            raise CheckpointError(f"{where}: scale {key!r} must be float32, got {t.dtype}")
        if not torch.isfinite(t).all() or (t <= 0).any():
            raise CheckpointError(f"{where}: scale {key!r} holds NaN, Inf or non-positive values")


def _fresh_rotary(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{buffer name: tensor}`` for rotary frequency buffers that a forward may have rescaled (transformers'
    dynamic and long RoPE): each ``<prefix>inv_freq`` beside a ``<prefix>original_inv_freq`` is saved as a copy
    of the original, the state of a freshly built model (which is what ``from_pretrained`` gives back too: the
    rescaled table and its cached length are runtime state, not part of the model)."""
    fresh = {}
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is None or not bname.endswith("inv_freq") or bname.endswith("original_inv_freq"):
                continue
            original = module._buffers.get(bname[: -len("inv_freq")] + "original_inv_freq")
            if isinstance(original, torch.Tensor) and original.shape == buf.shape:
                fresh[f"{mname}.{bname}" if mname else bname] = original.detach().to(buf.dtype, copy=True)
    return fresh


def _all_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], set[str]]:
    """Every tensor to store (state dict + non-persistent buffers), shared tensors stored once, still on
    the model's device (``write_shards`` copies them to the host one shard at a time).
    Returns ``(tensors, aliases {dropped key: stored key}, non-persistent buffer names, own_copy)``;
    ``own_copy``: keys of views into memory another stored tensor also uses (written from a copy of their own:
    safetensors stores each tensor separately). A buffer registered under two names (transformers' dynamic RoPE
    after a reset) is an alias like a tied weight; rescaled rotary tables are stored fresh (``_fresh_rotary``)."""
    state = model.state_dict()
    buffers = dict(model.named_buffers(remove_duplicate=False))
    non_persistent = [n for n in buffers if n not in state]
    fresh = _fresh_rotary(model)
    items = list(state.items()) + [(n, fresh.get(n, buffers[n])) for n in non_persistent]
    tensors, aliases, seen, storages, own_copy = {}, {}, {}, set(), set()
    for key, t in items:
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        storage = t.untyped_storage().data_ptr()
        if storage in storages:
            own_copy.add(key)
        storages.add(storage)
        tensors[key] = t
    return tensors, aliases, non_persistent, own_copy


def _check_savable(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """What would make a save fail half-way, checked before anything is written or removed: a partly
    converted model, tensors without data (meta: an offloaded model), a generation config transformers
    refuses to write."""
    partial = getattr(model, "sq_partial_conversion", None)
    if partial:
        remaining = list(partial.get("remaining", [])) if isinstance(partial, dict) else []
        raise ValueError(f"{where}: the model is only partly converted (quantize_ stopped with {len(remaining)} "
                         f"module(s) left, e.g. {remaining[:3]}); call quantize_ again to finish the conversion "
                         f"before saving")
    meta_keys = [k for k, t in tensors.items() if t.is_meta]
    if meta_keys:
        raise ValueError(f"{where}: {len(meta_keys)} tensor(s) hold no data (meta device: an offloaded or not fully "
                         f"loaded model), e.g. {meta_keys[:3]}; load the whole model onto a device before saving")
    generation_config = getattr(model, "generation_config", None)
    validate = getattr(generation_config, "validate", None)
    if callable(validate):
        try:
            validate(strict=True)
        except TypeError:  # a transformers whose validate() takes no strict flag
            validate()
        except ValueError as exc:
            raise ValueError(f"{where}: model.generation_config is invalid, so it cannot be saved (nothing was "
                             f"written): {exc}") from None


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def parse_size(size, what: str = "max_shard_size") -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (GB = 10^9, GiB = 2^30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):] or "B"
        try:
            value = int(float(number) * SIZE_UNITS[unit]) if unit in SIZE_UNITS else None
        except (ValueError, OverflowError):  # not a number; inf
            value = None
        if value is None:
            raise ValueError(f"{what} must be a number of bytes or a size such as '5GB', '500MB' or '2GiB', "
                             f"got {size!r}")
    else:
        raise ValueError(f"{what} must be a number of bytes or a size such as '5GB', got {size!r}")
    if value < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return value


def plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive groups of keys whose bytes stay within ``limit`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes.items():
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def write_shards(tensors: dict[str, torch.Tensor], path: Path, groups: list[list[str]], single: str, pattern: str,
                 metadata: dict[str, str], own_copy: set[str] = frozenset(),
                 progress: bool = False) -> list[tuple[str, list[str]]]:
    """Write ``tensors`` to ``path/single``, or, with several ``groups`` (``plan_shards``), group i to
    ``pattern.format(i, n)``. Each shard's tensors are copied to the host (made contiguous) only while it is
    written, so a model on a GPU never needs its whole size in host memory. Returns ``(file name, its keys)``."""
    from safetensors.torch import save_file
    names = [single] if len(groups) == 1 else [pattern.format(i + 1, len(groups)) for i in range(len(groups))]
    bar = None
    if progress and len(groups) > 1:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(groups), desc="writing shards", unit="shard")
    for i, (name, keys) in enumerate(zip(names, groups)):
        host = {}
        for k in keys:
            t = tensors[k].to("cpu").contiguous()
            host[k] = t.clone() if k in own_copy else t
        save_file(host, str(path / name), metadata=dict(metadata, **({"shard": f"{i + 1}/{len(groups)}"}
                                                                      if len(groups) > 1 else {})))
        del host
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return list(zip(names, groups))


def hf_weight_files(path) -> list[str]:
    """The names of a Hugging Face model's weight files in directory ``path`` (none if it does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name.startswith(("model.safetensors", "pytorch_model"))
                  or (p.name.startswith("model-") and p.suffix in (".safetensors", ".bin"))
                  or p.name in ("tf_model.h5", "flax_model.msgpack"))


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule``), or ``model`` itself."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def stored_float_dtype(model: nn.Module):
    """The dtype of the model's floating-point parameters (embeddings, norms): what its config records."""
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), None)


def quantization_method(path) -> str | None:
    """``quantization_config.quant_method`` of ``path/config.json`` (``"compressed-tensors"``, say), if any."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant.get("quant_method") if isinstance(quant, dict) else None


def save_quantized(model: nn.Module, path, *, max_shard_size=DEFAULT_SHARD_SIZE, progress: bool = True) -> Path:
    """Write the quantized HF ``model`` to directory ``path`` (created if needed). Returns the path.

    ``max_shard_size``: bytes (int) or a size such as ``"5GB"``, ``"500MB"``, ``"2GiB"``; weights beyond it are
    split into ``sq_model-0000i-of-0000n.safetensors`` shards (a tensor larger than the limit gets a shard of
    its own). Each shard is copied to host memory only while it is written. ``progress``: a bar over the
    shards when there are several.

    A ``torch.compile`` wrapper is unwrapped (its module is saved). A directory holding another model's weight
    files is refused: ``from_pretrained`` would still load those, beside the quantized checkpoint."""
    from . import __version__
    limit = parse_size(max_shard_size)
    model = unwrap_compiled(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(f"save_quantized needs a Hugging Face model with a config, got {type(model).__name__}")
    table = _module_table(model)
    if not table:
        raise ValueError("save_quantized: the model has no W8A8 modules; quantize it first (quantize_ or smoothquant)")
    tensors, aliases, non_persistent, own_copy = _all_tensors(model)
    for key in list(aliases):
        if any(key.startswith(name + ".") for name in table):
            raise ValueError(f"save_quantized: {key} shares memory with {aliases[key]}; W8A8 buffers must be their own")
    _check_savable(model, tensors, "save_quantized")
    _check_scales(tensors, table, "save_quantized")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_quantized: {path} is a file; give a directory")
    weights = hf_weight_files(path)
    if weights:
        raise ValueError(f"save_quantized: {path} holds a model's weights ({', '.join(weights[:3])}); save the "
                         f"quantized model to a directory of its own")
    path.mkdir(parents=True, exist_ok=True)
    saved_config = copy.deepcopy(config)  # the user's model keeps its own config as it was
    saved_config.architectures = [type(model).__name__]
    if stored_float_dtype(model) is not None:  # the dtype the floating-point rest is stored in (after .half())
        saved_config.dtype = stored_float_dtype(model)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not hasattr(generation_config, "save_pretrained"):
        generation_config = None
    # the small files are written aside first: a failure there leaves an earlier checkpoint in `path` whole
    with tempfile.TemporaryDirectory(prefix=".sq_save-", dir=path) as staging:
        saved_config.save_pretrained(staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        earlier = (path / QUANT_FILE).is_file()
        (path / QUANT_FILE).unlink(missing_ok=True)  # written last: its presence marks a complete checkpoint
        for old in _own_weight_files(path):  # an earlier save's weights (another shard count): not this model's
            old.unlink()
        if earlier and generation_config is None:  # the earlier model's, which a load would otherwise pick up
            (path / "generation_config.json").unlink(missing_ok=True)
        for f in Path(staging).iterdir():
            os.replace(f, path / f.name)
    meta = {
        "format": FORMAT,
        "format_version": 1,  # 2 when sharded, below
        "sq_kernels_version": __version__,
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "config_sha256": _config_digest(path / "config.json"),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": None,  # filled in below, once the weights are written
        "modules": table,
        "tied": aliases,
        "non_persistent_buffers": non_persistent,
        "quantization": getattr(model, "sq_quantization", None),
    }
    groups = plan_shards({k: _nbytes(t) for k, t in tensors.items()}, limit)
    sharded = len(groups) > 1
    # the table's digest goes into every weights file, so an edit of sq_quantization.json is detected on load
    written = write_shards(tensors, path, groups, WEIGHTS_FILE, SHARD_FILE,
                           {"format": FORMAT, "format_version": str(2 if sharded else 1),
                            TABLE_DIGEST_KEY: _table_digest(meta)}, own_copy, progress=progress)
    if not sharded:
        meta["weights_sha256"] = _sha256_file(path / WEIGHTS_FILE)
    else:  # version 2: a release that reads only version 1 says "written by a newer sq_kernels", not "missing file"
        meta["format_version"] = 2
        del meta["weights_file"], meta["weights_sha256"]
        meta["shards"] = [{"file": name, "sha256": _sha256_file(path / name)} for name, _ in written]
    (path / QUANT_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return path


def _own_weight_files(path: Path) -> list[Path]:
    """The weights files an sq_kernels save writes into ``path`` (one file or shards)."""
    return sorted(p for p in path.glob("sq_model*.safetensors")
                  if p.name == WEIGHTS_FILE or re.fullmatch(r"sq_model-\d{5}-of-\d{5}\.safetensors", p.name))


def weights_files(meta: dict) -> list[tuple[str, str | None]]:
    """``(file name, SHA-256 or None)`` of every weights file of a checked quantization config, in order."""
    if "shards" in meta:
        return [(e["file"], e.get("sha256")) for e in meta["shards"]]
    return [(meta["weights_file"], meta.get("weights_sha256"))]


def read_quantization_config(path) -> dict:
    """The checked ``sq_quantization.json`` of checkpoint directory ``path``."""
    path = Path(path)
    qfile = path / QUANT_FILE
    if not qfile.is_file():
        if (path / "config.json").is_file():
            if quantization_method(path) == "compressed-tensors":
                raise CheckpointError(f"{path} is a compressed-tensors checkpoint, not an sq_kernels one: read it "
                                      f"with sq_kernels.export.load_compressed_tensors (sq-kernels eval reads both)")
            raise CheckpointError(f"{path} is a Hugging Face checkpoint without {QUANT_FILE}: not an sq_kernels "
                                  f"quantized model (or its save did not finish). Quantize it with smoothquant().")
        if not path.exists():
            raise CheckpointError(f"{path}: no such directory")
        raise CheckpointError(f"{path} is not a checkpoint directory (no {QUANT_FILE})")
    try:
        meta = json.loads(qfile.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{qfile} is corrupt (not JSON: {exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{qfile} is corrupt (not UTF-8 text)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{qfile}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{qfile}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{qfile}: format_version {version} was written by a newer sq_kernels "
                              f"({meta.get('sq_kernels_version')}); this one reads up to {FORMAT_VERSION}. "
                              f"Upgrade sq_kernels.")
    for key in ("architecture", "config_sha256", "weights_file" if version == 1 else "shards", "modules"):
        if key not in meta:
            raise CheckpointError(f"{qfile}: missing field {key!r}")
    _check_schema(meta, qfile)
    return meta


def _check_schema(meta: dict, qfile: Path) -> None:
    """Reject a quantization file whose fields have the wrong type, naming the file, module and field."""
    for key in ("architecture", "config_sha256") + (("weights_file",) if "weights_file" in meta else ()):
        if not isinstance(meta[key], str) or not meta[key]:
            raise CheckpointError(f"{qfile}: field {key!r} must be a non-empty string, got {meta[key]!r}")
    for key in ("model_type", "weights_sha256"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise CheckpointError(f"{qfile}: field {key!r} must be a string, got {meta[key]!r}")
    if "weights_file" in meta:
        _check_weights_file(meta["weights_file"], qfile)
    if "shards" in meta:
        shards = meta["shards"]
        if not isinstance(shards, list) or not shards or not all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"] for e in shards):
            raise CheckpointError(f"{qfile}: field 'shards' must be a non-empty list of {{'file': name, 'sha256': "
                                  f"hex}} objects, got {shards!r}")
        files = [e["file"] for e in shards]
        if len(set(files)) != len(files):
            raise CheckpointError(f"{qfile}: field 'shards' names a file twice: {files}")
        for e in shards:
            _check_weights_file(e["file"], qfile, "shards")
            if not isinstance(e.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", e["sha256"]):
                raise CheckpointError(f"{qfile}: shard {e['file']!r}: 'sha256' must be the file's SHA-256 (64 hex "
                                      f"digits), got {e.get('sha256')!r}")
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CheckpointError(f"{qfile}: field 'tied' must map tensor names to tensor names, got {tied!r}")
    buffers = meta.get("non_persistent_buffers", [])
    if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
        raise CheckpointError(f"{qfile}: field 'non_persistent_buffers' must be a list of names, got {buffers!r}")
    modules = meta["modules"]
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{qfile}: field 'modules' must be a non-empty object {{module name: entry}}, "
                              f"got {modules!r}")
    for name, entry in modules.items():
        where = f"{qfile}: module {name!r}"
        if not name or not isinstance(entry, dict):
            raise CheckpointError(f"{where}: the entry must be an object with a 'kind', got {entry!r}")
        kind = entry.get("kind")
        if kind not in MODULE_FIELDS:
            raise CheckpointError(f"{where}: field 'kind' must be one of {sorted(MODULE_FIELDS)}, got {kind!r}")
        for field, typ in MODULE_FIELDS[kind].items():
            if field not in entry:
                raise CheckpointError(f"{where}: missing field {field!r} (a {kind!r} entry needs "
                                      f"{sorted(MODULE_FIELDS[kind])})")
            value = entry[field]
            if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CheckpointError(f"{where}: field {field!r} must be a positive integer, got {value!r}")
            if not isinstance(value, typ):
                raise CheckpointError(f"{where}: field {field!r} must be a {typ.__name__}, got {value!r}")
        if entry["weight"] not in WEIGHT_GRANULARITIES:
            raise CheckpointError(f"{where}: field 'weight' must be one of {WEIGHT_GRANULARITIES}, "
                                  f"got {entry['weight']!r}")
        if entry["activation"] not in ACTIVATION_SCHEMES:
            raise CheckpointError(f"{where}: field 'activation' must be one of {ACTIVATION_SCHEMES}, "
                                  f"got {entry['activation']!r}")


def _check_weights_file(name: str, qfile: Path, field: str = "weights_file") -> None:
    """A weights file must be named as a file inside the checkpoint directory: no path, no ``..``."""
    if (name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute()
            or PureWindowsPath(name).drive):
        raise CheckpointError(f"{qfile}: field {field!r} must be a plain file name inside the checkpoint "
                              f"directory (such as {WEIGHTS_FILE!r}), got {name!r}")


def check_device(device, what: str = "device") -> torch.device:
    """``device`` (None: CPU) as a ``torch.device`` that exists here, or a ValueError naming ``what`` (the
    argument: ``device``, or the CLI's ``--device``)."""
    expected = "'cpu', 'cuda' or 'cuda:N' (or another available torch device type, a torch.device, a GPU index)"
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"{what} must be {expected}, got {type(device).__name__} {device!r}")
    if isinstance(device, int):  # a GPU index, as torch.device(0) reads it
        if device < 0:
            raise ValueError(f"{what} must be a non-negative GPU index, got {device}")
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} must be {expected}, got {device!r}") from None
    if dev.type == "meta":
        raise ValueError(f"{what} 'meta' holds no data: use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("torch was built without CUDA" if torch.version.cuda is None and torch.version.hip is None
                   else "no GPU is visible (torch.cuda.is_available() is False)")
            raise ValueError(f"{what} {str(device)!r} is not available: {why}; use {what} 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {str(device)!r} is not available: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            raise ValueError(f"{what} {str(device)!r} is not available: torch.{dev.type}.is_available() is False")
    return dev


def model_class(name: str, where: str):
    """The transformers model class called ``name`` (named by ``where``), or a CheckpointError."""
    import transformers
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"this transformers ({transformers.__version__}) has no model class {name!r} ({where})")
    return cls


def skeleton(cls, config, device) -> nn.Module:
    """``cls(config)`` with every parameter on the meta device (nothing allocated, no initialisation run) and
    every buffer computed by the modules' own constructors and moved to ``device``: rotary tables, Gemma's
    embedding scale and the like, which a checkpoint does not store. Parameters are created on the CPU for
    an instant (uninitialised ``torch.empty``: untouched pages) and replaced by meta tensors as each is
    registered."""
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = type(param)(param.data.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        with torch.device("cpu"):
            model = cls(config)
    finally:
        nn.Module.register_parameter = original
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device)
    return model


def cast_floats_(tensors: dict[str, torch.Tensor], dtype, keep: set[str]) -> None:
    """Cast the floating-point tensors of ``tensors`` (in place, one at a time) to ``dtype``, except ``keep``."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.dtype != dtype and key not in keep:
            tensors[key] = t.to(dtype)


def finish_loading(model: nn.Module, path: Path, dtype, where) -> nn.Module:
    """The end of every load: no tensor left on the meta device, the generation config, the recorded dtype,
    ``save_pretrained`` guarded (see ``guard_hf_saving``); the model in eval mode."""
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{where} left tensors unset: {still_meta[:6]}")
    install_sharing_scopes(m for m in model.modules() if any(isinstance(c, W8A8Linear) for c in m.children()))
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    if dtype is not None:
        model.config.dtype = dtype
    guard_hf_saving(model)
    return model.eval()


def _build_skeleton(path: Path, meta: dict, attn_implementation: str | None = None, compute_buffers: bool = False):
    """The model of ``meta['architecture']`` from ``path/config.json`` on the meta device, with W8A8 modules
    where the table says; ``compute_buffers``: its buffers computed from the config on the CPU (``skeleton``),
    to compare with the stored ones."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/config.json could not be read as a transformers config: {exc}") from None
    if attn_implementation is not None:  # checked by transformers when the model is built: a ValueError
        config._attn_implementation = attn_implementation
    if meta.get("model_type") and config.model_type != meta["model_type"]:
        raise CheckpointError(f"config.json is a {config.model_type!r} config but the weights were saved from a "
                              f"{meta['model_type']!r} model")
    cls = model_class(meta["architecture"], f"the 'architecture' field of {QUANT_FILE}")
    try:
        if compute_buffers:
            model = skeleton(cls, config, "cpu")
        else:
            with torch.device("meta"):
                model = cls(config)
    except Exception as exc:  # noqa: BLE001  (a class that does not take this config fails in its own way)
        raise CheckpointError(f"{meta['architecture']} (the 'architecture' field of {QUANT_FILE}) could not be "
                              f"built from config.json ({config.model_type}): {type(exc).__name__}: {exc}") from None
    for name, d in meta["modules"].items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the quantized module {name!r} does not exist in {meta['architecture']} built from "
                                  f"config.json: the checkpoint does not match its config") from None
        if d["kind"] == "linear":
            shape = (getattr(original, "in_features", None), getattr(original, "out_features", None))
            if shape != (d["in_features"], d["out_features"]):
                raise CheckpointError(f"{name}: config.json gives a linear of (in, out) = {shape}, the checkpoint "
                                      f"holds {(d['in_features'], d['out_features'])}")
            new = W8A8Linear(d["in_features"], d["out_features"], d["bias"], d["weight"], d["activation"],
                             device="meta")
        elif d["kind"] == "experts":
            gate_up = getattr(original, "gate_up_proj", None)
            want = (d["num_experts"], 2 * d["intermediate_dim"], d["hidden_dim"])
            if gate_up is None or tuple(gate_up.shape) != want:
                raise CheckpointError(f"{name}: config.json gives experts {tuple(getattr(gate_up, 'shape', ()))}, the "
                                      f"checkpoint holds {want}")
            new = W8A8Experts(d["num_experts"], d["hidden_dim"], d["intermediate_dim"], original.act_fn,
                              d["weight"], d["activation"], device="meta")
        else:
            raise CheckpointError(f"{name}: unknown module kind {d['kind']!r}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def check_float_dtype(dtype, what: str = "dtype"):
    """None / ``"auto"`` (keep the saved dtypes), or a floating dtype the W8A8 modules run in, given as a
    ``torch.dtype`` or its name (``"float16"``, ``"bfloat16"``, ``"float32"``)."""
    if dtype is None or dtype == "auto":
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"{what} must be None, 'auto' or one of {names}, got {dtype!r}")
    return resolved


def _kept_float32(model: nn.Module) -> set[str]:
    """The W8A8 modules' scale and bias buffers, which stay float32 whatever the model's dtype."""
    return {f"{name}.{b}" if name else b for name, m in model.named_modules() if isinstance(m, KeepBufferDtypes)
            for b in m.FLOAT32_BUFFERS}


def load_quantized(path, device=None, verify: bool = True, *, dtype=None, attn_implementation: str | None = None):
    """Load a checkpoint written by ``save_quantized`` into its HF class with W8A8 modules.

    Args:
        path: the checkpoint directory.
        device: where the tensors go (default CPU); loaded there directly.
        verify: check the SHA-256 of the weights file (detects damaged bytes; costs one read of the file) and
            of ``config.json`` (False accepts an edited config; shapes are checked against the weights anyway).
        dtype: the floating dtype of the parameters and buffers that stay floating point (embeddings,
            norms, ``lm_head``): ``torch.float16`` / ``bfloat16`` / ``float32`` or its name; None or
            ``"auto"`` keeps the dtypes they were saved in. Each tensor is cast as it is read. The int8
            weights and the float32 scales and biases of the W8A8 modules are never cast, and neither are
            non-persistent buffers such as rotary frequencies (as ``from_pretrained(dtype=...)`` leaves them).
        attn_implementation: as for ``from_pretrained`` (``"eager"``, ``"sdpa"``, ...); None: transformers'
            default. The attention softmax stays in floating point either way.

    Returns:
        The model in eval mode. Raises ``CheckpointError`` (a ValueError) for a checkpoint that is not
        one, is damaged, has an unknown version, or whose config and weights do not match.
    """
    path = Path(path)
    device = check_device(device)
    dtype = check_float_dtype(dtype)
    meta = read_quantization_config(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    if verify and _config_digest(path / "config.json") != meta["config_sha256"]:
        raise CheckpointError(f"{path}/config.json does not match the quantized weights: it was edited after saving or "
                              f"belongs to another model (SHA-256 differs from the one recorded in {QUANT_FILE}). "
                              f"If you edited it on purpose (use_cache, say), load with verify=False: the module "
                              f"shapes are still checked against the weights")
    files = [(path / name, digest) for name, digest in weights_files(meta)]
    absent = [f.name for f, _ in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{path}: weights file{'s' if len(absent) > 1 else ''} {', '.join(absent[:4])} "
                              f"{'are' if len(absent) > 1 else 'is'} missing" + (f" ({len(files)} shards expected)"
                                                                                  if len(files) > 1 else ""))
    if verify:
        for f, digest in files:
            if digest and _sha256_file(f) != digest:
                raise CheckpointError(f"{f} is corrupt: its SHA-256 differs from the one recorded when it was saved")
    for f, _ in files:  # one header read each: an edited table is named as such, before the model is built from it
        file_meta = _file_metadata(f)
        if file_meta.get("format") != FORMAT:
            raise CheckpointError(f"{f} is not an sq_kernels weights file (format={file_meta.get('format')!r})")
        _check_table_digest(file_meta, f, meta, path)
    config_edited = _config_digest(path / "config.json") != meta["config_sha256"]
    model = _build_skeleton(path, meta, attn_implementation, compute_buffers=config_edited)
    expected_state = model.state_dict(keep_vars=True)
    non_persistent = set(meta.get("non_persistent_buffers", []))
    aliases = dict(meta.get("tied", {}))
    kept_float32 = _kept_float32(model) | non_persistent
    tensors, origin = {}, {}
    for weights, _ in files:  # shard by shard, each tensor straight to the device
        _read_weights_file(weights, device, dtype, kept_float32, tensors, origin)
    weights = files[0][0] if len(files) == 1 else path
    expected = (set(expected_state) | non_persistent) - set(aliases)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match {meta['architecture']} from config.json: "
                              f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                              f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    model_buffers = dict(model.named_buffers(remove_duplicate=False))
    for key, t in tensors.items():
        ref = expected_state.get(key, model_buffers.get(key))
        if ref is not None and tuple(ref.shape) != tuple(t.shape):
            raise CheckpointError(f"{key}: stored shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        if ref is not None and ((ref.dtype == torch.int8) != (t.dtype == torch.int8)
                                or ref.is_floating_point() != t.is_floating_point()):
            raise CheckpointError(f"{key}: stored dtype {t.dtype}, the model expects {ref.dtype}")
        if key in non_persistent and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{key}: the stored buffer holds NaN or Inf")
    if config_edited:
        _rebuild_edited_buffers(tensors, non_persistent, model_buffers, path)
    _check_scales(tensors, meta["modules"], str(weights))
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"tied tensor {alias!r} points at {target!r}, which the weights file lacks")
    state = {k: v for k, v in tensors.items() if k not in non_persistent}
    state.update({alias: tensors[target] for alias, target in aliases.items() if alias in expected_state})
    model.load_state_dict(state, strict=True, assign=True)
    for key in non_persistent:
        owner, _, buf = key.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[buf] = tensors[aliases.get(key, key)]
    for alias, target in aliases.items():  # re-tie: one Parameter object, as in the saved model
        a_owner, _, a_name = alias.rpartition(".")
        t_owner, _, t_name = target.rpartition(".")
        src = model.get_submodule(t_owner) if t_owner else model
        dst = model.get_submodule(a_owner) if a_owner else model
        if t_name in src._parameters and a_name in dst._parameters:
            dst._parameters[a_name] = src._parameters[t_name]
    model.sq_quantization = meta.get("quantization")
    return finish_loading(model, path, dtype, weights)


@contextmanager
def _open_weights(weights: Path, device: str = "cpu"):
    """``safe_open`` on a weights file, a damaged or unreadable one a CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(weights), framework="pt", device=device) as f:
            yield f
    except SafetensorError as exc:  # a damaged header or truncated data; anything else is not the file's fault
        raise CheckpointError(f"{weights} is corrupt or truncated: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{weights} could not be read: {exc}") from None


def _read_weights_file(weights: Path, device, dtype, kept_float32: set[str], tensors: dict, origin: dict) -> None:
    """Read every tensor of one weights file into ``tensors`` (cast to ``dtype`` as read, except
    ``kept_float32``); ``origin`` records each key's file, so a key in two shards is refused."""
    with _open_weights(weights, "cpu" if device.type == "cpu" else str(device)) as f:
        for k in f.keys():
            if k in origin:
                raise CheckpointError(f"{k} is stored twice, in {origin[k]} and {weights.name}")
            origin[k] = weights.name
        shard = {k: f.get_tensor(k) for k in f.keys()}
    if dtype is not None:  # one tensor at a time: never two copies of the shard
        cast_floats_(shard, dtype, kept_float32)
    tensors.update(shard)


def _file_metadata(weights: Path) -> dict:
    """The safetensors metadata of a weights file (its header only)."""
    with _open_weights(weights) as f:
        return f.metadata() or {}


def _rebuild_edited_buffers(tensors: dict, non_persistent: set[str], model_buffers: dict, path: Path) -> None:
    """config.json was edited after saving (``verify=False``): a non-persistent buffer the edited config
    computes differently (rotary frequencies after a ``rope_theta`` or RoPE-scaling edit) is taken from the
    model built from it, in the stored dtype, so the model follows its config; one it computes the same up
    to float rounding keeps its stored, bitwise value."""
    rebuilt = []
    for key in sorted(non_persistent):
        ref, t = model_buffers.get(key), tensors.get(key)
        if ref is None or t is None or ref.is_meta or not t.is_floating_point() or ref.shape != t.shape:
            continue
        computed = ref.to(device=t.device, dtype=t.dtype)
        ulps = 2 * torch.finfo(t.dtype).eps  # another device's math differs in the last bit, an edit by more
        if not torch.allclose(computed.float(), t.float(), rtol=ulps, atol=0.0):
            tensors[key] = computed
            rebuilt.append(key)
    if rebuilt:
        import warnings
        warnings.warn(f"{path}/config.json was edited after saving and gives other values for {len(rebuilt)} "
                      f"buffer(s) than the saved model had ({', '.join(rebuilt[:3])}"
                      f"{', ...' if len(rebuilt) > 3 else ''}): they were rebuilt from the edited config",
                      stacklevel=3)


def _check_table_digest(file_meta: dict, weights: Path, meta: dict, path: Path) -> None:
    recorded = file_meta.get(TABLE_DIGEST_KEY)  # absent in checkpoints saved before it was recorded
    if recorded is not None and recorded != _table_digest(meta):
        raise CheckpointError(f"{path / QUANT_FILE}: the quantization table (module entries, tied weights, "
                              f"architecture, config hash) was modified after saving, or {weights.name} belongs to "
                              f"another checkpoint: the table's SHA-256 differs from the one recorded in "
                              f"{weights.name}. Restore the original files or quantize again.")


class _HFSaveGuard:
    """Stands in for ``save_pretrained`` / ``push_to_hub`` on a model that holds W8A8 modules: transformers
    would write the int8 weights without their scales, and ``from_pretrained`` would then load them as
    floating-point weights (a model that runs and is silently wrong)."""

    def __init__(self, method: str):
        self.method = method

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.method}() cannot save a model with W8A8 modules: transformers would write the "
                           f"int8 weights without their scales, and from_pretrained would load them as floating-"
                           f"point weights. Use sq_kernels.save_quantized(model, directory) and "
                           f"sq_kernels.load_quantized(directory) instead.")


def guard_hf_saving(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` / ``push_to_hub`` raise (see ``_HFSaveGuard``); no-op for other models."""
    for method in ("save_pretrained", "push_to_hub"):
        if callable(getattr(model, method, None)):
            object.__setattr__(model, method, _HFSaveGuard(method))


def is_quantized_checkpoint(path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


__all__ = ["save_quantized", "load_quantized", "read_quantization_config", "is_quantized_checkpoint",
           "CheckpointError", "FORMAT_VERSION"]
