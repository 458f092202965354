"""Per-family smoothing tables and their registry.

A family is a small table (``FamilySpec``): where the decoder layers live, which norm feeds which
linears (``SmoothGroup``), the default alpha, modules that must stay in floating point (routers), and a
check that refuses configurations SmoothQuant cannot smooth (post-LN). One file per family, imported
only when a model of that family is seen, so an old or new ``transformers`` never breaks an import.
Adding a family is adding a table: ``register_family(spec)`` or ``SmoothQuantConfig(family=spec)``.
"""
from __future__ import annotations

import dataclasses
import importlib
import numbers
from dataclasses import dataclass, field
from typing import Callable

# model_type (HF config.model_type) -> module holding SPEC; imported lazily.
_REGISTRY: dict[str, str] = {
    "opt": "sq_kernels.families.opt",
    "llama": "sq_kernels.families.llama",
    "mistral": "sq_kernels.families.mistral",
    "mixtral": "sq_kernels.families.mixtral",
    "bloom": "sq_kernels.families.bloom",
    "falcon": "sq_kernels.families.falcon",
    "qwen2": "sq_kernels.families.qwen2",
    "qwen3": "sq_kernels.families.qwen3",
    "phi3": "sq_kernels.families.phi3",
    "qwen2_moe": "sq_kernels.families.qwen2_moe",
    "qwen3_moe": "sq_kernels.families.qwen3_moe",
    "gemma": "sq_kernels.families.gemma",
    "gemma2": "sq_kernels.families.gemma2",
    "gemma3_text": "sq_kernels.families.gemma3",
}
_USER: dict[str, "FamilySpec"] = {}
GROUP_KINDS = ("norm", "linear")


def _paths(value, what: str, example: str, empty: bool = False) -> tuple[str, ...]:
    """``value`` (a tuple or list of non-empty str) as a tuple; a bare str is refused (it is not a tuple of
    one: ``("a.b")`` is the str ``"a.b"``)."""
    if isinstance(value, str):
        raise ValueError(f"{what} must be a tuple of str, got the str {value!r} (a tuple of one is written "
                         f"({value!r},), with the comma)")
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value) or \
            (not value and not empty):
        raise ValueError(f"{what} must be a {'' if empty else 'non-empty '}tuple of non-empty str (e.g. "
                         f"({example!r},)), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class SmoothGroup:
    """One smoothing vector ``s``: ``source``'s output feeds every module in ``targets``.

    ``source`` is a norm (its weight, and bias if any, are divided by ``s``) or, for ``kind="linear"``, a
    linear whose output rows (and bias) are divided by ``s``. Each target's input-channel weights
    (``nn.Linear.weight [N, K]``, a router ``weight [E, K]``, fused experts ``gate_up_proj [E, 2I, K]``)
    are multiplied by ``s``. Paths are relative to one decoder layer.

    ``when`` (config -> bool) enables the group for some configurations only (Falcon's variants);
    ``in_layer`` (decoder layer -> bool) for some layers only (MoE models that mix dense and sparse MLPs).
    ``weight_offset``: the norm multiplies by ``weight_offset + weight`` (Gemma's RMSNorm: 1), so the fold
    divides that sum, not the stored weight.
    """
    source: str
    targets: tuple[str, ...]
    kind: str = "norm"
    when: Callable | None = None
    note: str = ""
    in_layer: Callable | None = None
    weight_offset: float = 0.0

    def __post_init__(self):
        what = f"SmoothGroup({self.source!r})"
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"SmoothGroup: source must be a non-empty module path (str), got {self.source!r}")
        object.__setattr__(self, "targets", _paths(self.targets, f"{what}: targets", "self_attn.q_proj"))
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"{what}: kind must be one of {GROUP_KINDS} ('norm': a norm's weight and bias are "
                             f"divided by s; 'linear': a linear's output rows), got {self.kind!r}")
        for name in ("when", "in_layer"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{what}: {name} must be None or a callable, got {type(value).__name__} {value!r}")
        if not isinstance(self.note, str):
            raise ValueError(f"{what}: note must be a str, got {type(self.note).__name__}")
        if isinstance(self.weight_offset, bool) or not isinstance(self.weight_offset, numbers.Real):
            raise ValueError(f"{what}: weight_offset must be a number (1.0 for a norm computing (1 + weight) * x), "
                             f"got {self.weight_offset!r}")

    def applies(self, config) -> bool:
        return self.when is None or bool(self.when(config))

    def present(self, layer) -> bool:
        return self.in_layer is None or bool(self.in_layer(layer))


@dataclass(frozen=True)
class FamilySpec:
    """The smoothing table of one model family.

    Attributes:
        name: family name shown to users.
        model_types: HF ``config.model_type`` values it covers.
        layers: dotted path of the decoder-layer ``ModuleList`` from the top-level model.
        groups: norm -> linears groups (always smoothed).
        linear_pairs: linear -> linear groups (smoothed with ``fold_linear_pairs=True``).
        default_alpha: the paper's / reference code's alpha for the family.
        keep_fp: fnmatch patterns (relative to a layer) of modules never quantized, with why.
        experts: paths (relative to a layer) of fused MoE expert modules (quantized as ``W8A8Experts``).
        refuse: config -> reason string when this configuration cannot be smoothed (post-LN), else None.
        keep_fp_modules: fnmatch patterns of full module names never quantized, with why (a multimodal
            model's vision tower).
        sub_config: the attribute of the model's config that ``refuse`` and ``SmoothGroup.when`` read
            (``"text_config"`` for a language model inside a multimodal model), or "" for the config itself.
        refuse_quantize: config -> reason string when this configuration cannot be quantized at all, smoothed
            or not (its forward reads linears' weights directly), else None; ``smooth_`` checks it too.

    Every field is checked when the table is built (ValueError naming the table and the field).
    """
    name: str
    model_types: tuple[str, ...]
    layers: str
    groups: tuple[SmoothGroup, ...]
    default_alpha: float
    linear_pairs: tuple[SmoothGroup, ...] = ()
    keep_fp: tuple[tuple[str, str], ...] = ()
    experts: tuple[str, ...] = ()
    refuse: Callable | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)
    keep_fp_modules: tuple[tuple[str, str], ...] = ()
    sub_config: str = ""
    refuse_quantize: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"FamilySpec: name must be a non-empty str, got {self.name!r}")
        what = f"FamilySpec {self.name!r}"
        object.__setattr__(self, "model_types", _paths(self.model_types, f"{what}: model_types", "llama"))
        if not isinstance(self.layers, str) or not self.layers:
            raise ValueError(f"{what}: layers must be the dotted path of the decoder layers (a non-empty str, e.g. "
                             f"'model.layers'), got {self.layers!r}")
        for name in ("groups", "linear_pairs"):
            value = getattr(self, name)
            if isinstance(value, SmoothGroup) or not isinstance(value, (tuple, list)) or \
                    not all(isinstance(g, SmoothGroup) for g in value):
                raise ValueError(f"{what}: {name} must be a tuple of SmoothGroup, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.default_alpha, bool) or not isinstance(self.default_alpha, numbers.Real) or \
                not 0.0 <= float(self.default_alpha) <= 1.0:
            raise ValueError(f"{what}: default_alpha must be a number in [0, 1] (the migration strength), got "
                             f"{self.default_alpha!r}")
        for name in ("keep_fp", "keep_fp_modules"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(
                    isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) and x for x in p)
                    for p in value):
                raise ValueError(f"{what}: {name} must be a tuple of (pattern, reason) pairs of non-empty str, got "
                                 f"{value!r}")
            object.__setattr__(self, name, tuple(tuple(p) for p in value))
        object.__setattr__(self, "experts", _paths(self.experts, f"{what}: experts", "mlp.experts", empty=True))
        for name in ("refuse", "refuse_quantize"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{what}: {name} must be None or a callable (config -> reason or None), got "
                                 f"{type(value).__name__} {value!r}")
        for name in ("description", "sub_config"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{what}: {name} must be a str, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"{what}: extra must be a dict, got {type(self.extra).__name__}")

    def table_config(self, config):
        """The part of the model's config this table reads."""
        return getattr(config, self.sub_config, None) if self.sub_config else config

    def refusal(self, config) -> str | None:
        """Why this configuration cannot be smoothed (``refuse``, then ``refuse_quantize``), or None."""
        reason = self.refuse(self.table_config(config)) if self.refuse is not None else None
        return reason or self.quantize_refusal(config)

    def quantize_refusal(self, config) -> str | None:
        """Why this configuration cannot be quantized, smoothed or not (``refuse_quantize``), or None."""
        return self.refuse_quantize(self.table_config(config)) if self.refuse_quantize is not None else None

    def active_groups(self, config, fold_linear_pairs: bool = False) -> list[SmoothGroup]:
        config = self.table_config(config)
        groups = [g for g in self.groups if g.applies(config)]
        if fold_linear_pairs:
            groups += [g for g in self.linear_pairs if g.applies(config)]
        return groups

    def skipped_pairs(self, config) -> list[SmoothGroup]:
        """The linear pairs that do not apply to this configuration."""
        return [g for g in self.linear_pairs if not g.applies(self.table_config(config))]


def register_family(spec: FamilySpec) -> None:
    """Register a user table for its ``model_types`` (it takes precedence over the built-in ones)."""
    if not isinstance(spec, FamilySpec):
        raise ValueError(f"register_family expects a FamilySpec, got {type(spec).__name__}")
    for model_type in spec.model_types:
        _USER[model_type] = spec


def is_user_table(spec: FamilySpec, override=None) -> bool:
    """Whether ``spec`` is a table of the user's (``family=`` given as a FamilySpec, or registered with
    ``register_family``), which ``smooth_`` proves on the model before trusting it."""
    return isinstance(override, FamilySpec) or any(spec is registered for registered in _USER.values())


def supported_model_types() -> list[str]:
    return sorted(set(_REGISTRY) | set(_USER))


def supported_families_text() -> str:
    return ("OPT (opt), Llama 1/2/3 (llama), Mistral (mistral), Mixtral (mixtral), BLOOM (bloom), "
            "Falcon (falcon), Qwen2 (qwen2), Qwen3 (qwen3), Qwen2-MoE (qwen2_moe), Qwen3-MoE (qwen3_moe), "
            "Phi-3 (phi3), Gemma (gemma), Gemma 2 (gemma2), Gemma 3 text (gemma3_text), and multimodal models "
            "built around one of these (gemma3, llava, mistral3, ...: the language model is smoothed, the vision "
            "tower kept in floating point)" + (f"; registered: {sorted(_USER)}" if _USER else ""))


class UnsupportedModelError(ValueError):
    """The model's architecture has no smoothing table (the message lists the supported ones)."""


def family_for_model_type(model_type: str) -> FamilySpec:
    if model_type in _USER:
        return _USER[model_type]
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"SmoothQuant has no smoothing table for model_type {model_type!r}. Supported: "
            f"{supported_families_text()}. Let sq_kernels infer one from the model with "
            f"SmoothQuantConfig(family='auto') (CLI --family auto), pass your own with "
            f"SmoothQuantConfig(family=FamilySpec(...)) or sq_kernels.families.register_family, or quantize without "
            f"smoothing (smooth=False).")
    return importlib.import_module(_REGISTRY[model_type]).SPEC


def family_of(model, override: FamilySpec | None = None, pairs: bool = False) -> FamilySpec:
    """The table for ``model`` (an HF ``PreTrainedModel``), or ``override`` when given (``"auto"``: inferred
    from the model, see ``sq_kernels.families.auto``; ``pairs``: with its linear pairs)."""
    if isinstance(override, str) and override == "auto":
        from .auto import infer_family
        return infer_family(model, pairs)
    if override is not None:
        if not isinstance(override, FamilySpec):
            raise ValueError(f"family must be a sq_kernels.families.FamilySpec or 'auto', got "
                             f"{type(override).__name__} {override!r}")
        return override
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face model with a config.model_type, so no smoothing "
            f"table applies. Supported: {supported_families_text()}. Pass SmoothQuantConfig(family=...) "
            f"or quantize without smoothing (smooth=False).")
    if model_type not in _USER and model_type not in _REGISTRY:
        wrapped = _language_model_spec(model, config)
        if wrapped is not None:
            return wrapped
    return family_for_model_type(model_type)


LANGUAGE_MODEL_PATHS = ("model.language_model", "language_model")  # transformers 5, then older layouts


def _language_model_spec(model, config) -> FamilySpec | None:
    """The table of the language model inside a multimodal model (Gemma 3, LLaVA, Mistral 3, ...): the text
    family's table, re-rooted at the language model, with every module beside it (vision tower, projector)
    kept in floating point. None when ``model`` is not such a wrapper of a supported text family."""
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    if text_type is None or (text_type not in _USER and text_type not in _REGISTRY):
        return None
    spec = family_for_model_type(text_type)
    for root in LANGUAGE_MODEL_PATHS:
        try:
            model.get_submodule(root)
        except AttributeError:
            continue
        inner = spec.layers.split(".", 1)[1] if "." in spec.layers else spec.layers  # "model.layers" -> "layers"
        try:
            model.get_submodule(f"{root}.{inner}")
        except AttributeError:
            return None
        return dataclasses.replace(
            spec, name=f"{spec.name} in {type(model).__name__}", model_types=(config.model_type,),
            layers=f"{root}.{inner}", keep_fp_modules=spec.keep_fp_modules + outside_language_model(model, root),
            sub_config="text_config",
            description=f"the {spec.name} table applied to the language model of a multimodal {config.model_type}")
    return None


def language_model_root(model, layers: str) -> str | None:
    """The language model's path when the decoder layers at ``layers`` belong to the language model of a
    multimodal model (a config with ``text_config``), else None."""
    if getattr(getattr(model, "config", None), "text_config", None) is None:
        return None
    return next((root for root in LANGUAGE_MODEL_PATHS if layers.startswith(root + ".")), None)


def outside_language_model(model, root: str) -> tuple[tuple[str, str], ...]:
    """Keep-FP patterns, with the reason, for every module beside the language model at ``root`` (the vision
    tower, the projector): the calibration data is text only, so their inputs are never observed."""
    parent_path, _, child = root.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    prefix = f"{parent_path}." if parent_path else ""
    return tuple((f"{prefix}{name}.*", f"outside the language model ({name}): calibration is text-only, so its "
                  f"inputs are never observed") for name, _ in parent.named_children() if name != child)


def get_submodule(root, path: str):
    """``root.get_submodule(path)`` with an error that names what is missing."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError as exc:
        raise ValueError(f"{type(root).__name__} has no submodule {path!r} ({exc}); the smoothing table does "
                         f"not match this model (another transformers version or a custom variant?)") from None


def decoder_layers(model, spec: FamilySpec) -> list[tuple[str, object]]:
    """``[(name, layer)]`` of the decoder layers named by ``spec.layers``."""
    layers = get_submodule(model, spec.layers)
    return [(f"{spec.layers}.{i}", layer) for i, layer in enumerate(layers)]


__all__ = ["FamilySpec", "SmoothGroup", "register_family", "supported_model_types", "family_of",
           "family_for_model_type", "UnsupportedModelError", "decoder_layers", "get_submodule", "language_model_root",
           "outside_language_model"]
