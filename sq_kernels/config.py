"""``SmoothQuantConfig``: what to smooth, how hard, and how each linear is quantized.

Schemes (all weights INT8 symmetric; the paper's Table 2 plus the robust default)::

    preset   weight         activation
    W8A8     per_channel    per_token   (dynamic)   the default: robust on every family
    O1       per_tensor     per_token   (dynamic)
    O2       per_tensor     per_tensor  (dynamic)
    O3       per_tensor     static      (one per-tensor scale from calibration)

``weight=`` / ``activation=`` override the preset's granularities. ``set_local`` gives one module
(by name pattern) or one module type (by class name) its own scheme, or keeps it in floating point,
like Neural Compressor's ``set_local``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from dataclasses import dataclass, field
from typing import Any

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACTIVATION_SCHEMES = ("per_token", "per_tensor", "static")
SCHEMES = {
    "W8A8": ("per_channel", "per_token"),
    "O1": ("per_tensor", "per_token"),
    "O2": ("per_tensor", "per_tensor"),
    "O3": ("per_tensor", "static"),
}
FP = "fp"  # set_local value: keep the module in floating point
DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class Scheme:
    """How one module is quantized: ``weight`` granularity and ``activation`` scheme."""
    weight: str = "per_channel"
    activation: str = "per_token"

    def __post_init__(self):
        if self.weight not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight!r}")
        if self.activation not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation scheme must be one of {ACTIVATION_SCHEMES}, got {self.activation!r}")

    def __str__(self) -> str:
        act = "static per-tensor" if self.activation == "static" else f"dynamic {self.activation}"
        return f"w8 {self.weight.replace('_', '-')} / a8 {act.replace('_', '-')}"


def check_alpha(alpha, what: str = "alpha") -> None:
    """Reject an alpha outside [0, 1] (or a non-number) with a ValueError naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):  # numpy scalars are numbers.Real
        hint = " (for a one-element tensor pass float(t))" if type(alpha).__name__ == "Tensor" else ""
        raise ValueError(f"{what} must be a number in [0, 1] or 'auto', got {alpha!r}{hint}")
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"{what} must lie in [0, 1] (the migration strength), got {alpha}")


@dataclass
class SmoothQuantConfig:
    """Everything ``smoothquant`` / ``smooth_`` / ``quantize_`` need to know.

    Attributes:
        alpha: migration strength in [0, 1]; ``None`` uses the family's default; ``"auto"`` searches
            ``alpha_grid`` per decoder layer on calibration data (minimising the quantized layer's
            output error against the floating-point layer).
        alpha_grid: the candidates of the ``"auto"`` search.
        alpha_search_batches: how many calibration batches the ``"auto"`` search evaluates per layer.
        scheme: a preset, ``"W8A8"`` (default), ``"O1"``, ``"O2"`` or ``"O3"`` (see module docstring).
        weight: overrides the preset's weight granularity (``"per_channel"`` / ``"per_tensor"``).
        activation: overrides the preset's activation scheme (``"per_token"`` / ``"per_tensor"`` /
            ``"static"``).
        include: patterns (a list/tuple, or a str for one pattern); only matching linears are quantized.
            A pattern matches a module's full name (fnmatch), the end of it after a dot (``"q_proj"``,
            ``"self_attn.*"``) or its class name (``"Linear"``); the same rule for ``exclude`` and ``local``.
        exclude: patterns of modules kept in floating point (``lm_head`` by default; a str is one pattern).
        local: per-module rules, applied in order (later wins): ``{pattern or class name: "fp" or
            {"weight": ..., "activation": ...}}``; fill it with ``set_local``.
        smooth: False quantizes without smoothing (naive W8A8). ``smooth``, ``fold_linear_pairs`` and
            ``progress`` must be real bools (a string such as ``"false"`` is refused, not read as truthy).
        fold_linear_pairs: also smooth the linears that have no norm in front by folding ``s`` into
            the linear that produces their input (up -> down, OPT fc1 -> fc2 through ReLU, v -> o
            without grouped-query attention).
        family: a ``sq_kernels.families.FamilySpec`` to use instead of the registered table, or ``"auto"``: a
            table inferred from the model (``sq_kernels.families.auto``), for architectures without one.
        num_samples / seq_len / batch_size: calibration data (samples of ``seq_len`` tokens).
        calibration_device: where calibration and the alpha search run (default: where the model is). A
            device other than the model's (``"cuda"`` for a model in CPU memory too large for the GPU) runs
            the decoder layers one at a time on it (``sq_kernels.layerwise``); smoothing and quantization
            then happen where the model is.
        progress: show tqdm progress bars.
    """
    alpha: float | str | None = None
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    alpha_search_batches: int = 8
    scheme: str = "W8A8"
    weight: str | None = None
    activation: str | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lm_head",)
    local: dict[str, Any] = field(default_factory=dict)
    smooth: bool = True
    fold_linear_pairs: bool = False
    family: Any = None
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 1
    calibration_device: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SmoothQuantConfig":
        """Check every field (raising a ValueError that names it) and normalise the collections: ``include``
        / ``exclude`` become tuples of patterns (a bare string is one pattern), ``alpha_grid`` a tuple of
        floats and ``local`` this config's own dict. Also called by ``smoothquant`` / ``smooth_`` /
        ``quantize_``, so fields assigned after construction are checked too. Returns ``self``."""
        self.include = _patterns(self.include, "include")
        self.exclude = _patterns(self.exclude, "exclude")
        self.alpha_grid = _alpha_grid(self.alpha_grid)
        if not isinstance(self.local, dict):
            raise ValueError(f"local must be a dict {{pattern: 'fp' or {{'weight': ..., 'activation': ...}}}} "
                             f"(fill it with set_local), got {type(self.local).__name__} {self.local!r}")
        # this config's own copy of the dict and of each rule (set_local must not write into a dict the caller
        # passed in, nor an edit of theirs change this config); a Scheme value becomes its dict, as set_local's
        self.local = {k: (dataclasses.asdict(v) if isinstance(v, Scheme) else dict(v) if isinstance(v, dict) else v)
                      for k, v in self.local.items()}
        if self.alpha is not None and not (isinstance(self.alpha, str) and self.alpha == "auto"):
            check_alpha(self.alpha)
            self.alpha = float(self.alpha)  # a numpy scalar becomes a float (the config is saved as JSON)
        for name in ("smooth", "fold_linear_pairs", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "false" would be truthy, None falsy
                raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
        if not isinstance(self.scheme, str) or self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {self.scheme!r}")
        for name, label, allowed in (("weight", "weight granularity", WEIGHT_GRANULARITIES),
                                     ("activation", "activation scheme", ACTIVATION_SCHEMES)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value not in allowed):
                raise ValueError(f"{name}: the {label} must be None (the scheme's default) or one of {allowed}, got "
                                 f"{value!r}")
        self.default_scheme()
        for key, value in self.local.items():
            _check_local(key, value)
        if self.family is not None and not (isinstance(self.family, str) and self.family == "auto"):
            from .families import FamilySpec
            if not isinstance(self.family, FamilySpec):
                raise ValueError(f"family must be None, 'auto' or a sq_kernels.families.FamilySpec, got "
                                 f"{type(self.family).__name__} {self.family!r}")
        if self.calibration_device is not None:
            import torch
            device = self.calibration_device
            if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)) or \
                    (isinstance(device, int) and device < 0):
                raise ValueError(f"calibration_device must be None, a device string such as 'cuda' or 'cuda:1', a "
                                 f"torch.device or a GPU index, got {type(device).__name__} {device!r}")
            try:
                self.calibration_device = str(torch.device(f"cuda:{device}" if isinstance(device, int) else device))
            except (RuntimeError, ValueError):
                raise ValueError(f"calibration_device must be a device such as 'cuda' or 'cuda:1', got {device!r}") \
                    from None
        for name in ("num_samples", "seq_len", "batch_size", "alpha_search_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))  # a numpy integer becomes an int (the config is saved as JSON)
        return self

    def default_scheme(self) -> Scheme:
        weight, activation = SCHEMES[self.scheme]
        return Scheme(weight if self.weight is None else self.weight,
                      activation if self.activation is None else self.activation)

    def set_local(self, pattern: str, scheme: str | dict | Scheme | None = None, **overrides) -> "SmoothQuantConfig":
        """Give modules matching ``pattern`` (fnmatch on the name, or a class name such as ``"Linear"``)
        their own treatment: ``"fp"`` keeps them in floating point; a dict / ``Scheme`` / keyword
        arguments (``weight=``, ``activation=``) change their scheme. Rules apply in the order they were
        set and the last matching one wins (a scheme rule set after ``"fp"`` quantizes the module again), so
        set ``"fp"`` pins last. Returns ``self``."""
        if scheme is None:
            scheme = dict(overrides)
        elif overrides:
            raise ValueError("set_local: pass either a scheme or keyword overrides, not both")
        if isinstance(scheme, Scheme):
            scheme = dataclasses.asdict(scheme)
        _check_local(pattern, scheme)
        self.local.pop(pattern, None)  # a pattern set again moves to the end: the last rule set wins
        self.local[pattern] = scheme if scheme == FP else dict(scheme)  # the caller's dict stays theirs
        return self

    def resolve(self, name: str, module) -> Scheme | str:
        """The scheme for module ``name``, or a reason string when it stays in floating point."""
        if not any(pattern_matches(p, name, module) for p in self.include):
            return f"not matched by include={list(self.include)}"
        for pattern in self.exclude:
            if pattern_matches(pattern, name, module):
                return f"excluded by pattern {pattern!r}"
        scheme = self.default_scheme()
        reason = None
        for key, value in self.local.items():
            if pattern_matches(key, name, module):
                if value == FP:
                    reason = f"kept in floating point by set_local({key!r}, 'fp')"
                else:
                    reason = None
                    scheme = Scheme(value.get("weight", scheme.weight), value.get("activation", scheme.activation))
        return reason if reason is not None else scheme

    def needs_static_scales(self) -> bool:
        if self.default_scheme().activation == "static":
            return True
        return any(v != FP and v.get("activation") == "static" for v in self.local.values())

    def to_dict(self) -> dict:
        """A JSON-serialisable form (the family table is recorded by name only)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "family"}
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["alpha_grid"] = list(self.alpha_grid)
        out["local"] = {k: v if v == FP else dict(v) for k, v in self.local.items()}  # a copy, not this config's
        out["family"] = self.family if self.family == "auto" else getattr(self.family, "name", None)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SmoothQuantConfig":
        if not isinstance(data, dict):
            raise ValueError(f"SmoothQuantConfig.from_dict: data must be a dict (what to_dict returns, or its JSON "
                             f"read back), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SmoothQuantConfig: unknown fields {unknown}")
        data = {k: v for k, v in data.items() if k != "family" or v == "auto"}
        return cls(**data)


def _patterns(value, what: str) -> tuple[str, ...]:
    """``value`` as a tuple of fnmatch patterns: a str is one pattern; a list / tuple / set of str as is."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"{what} must be a pattern (str) or a list/tuple of patterns, got "
                         f"{type(value).__name__} {value!r}")
    bad = [p for p in value if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"{what} must hold non-empty strings (fnmatch patterns on module names), got {bad!r} "
                         f"in {value!r}")
    return tuple(sorted(value) if isinstance(value, (set, frozenset)) else value)


def _alpha_grid(value) -> tuple[float, ...]:
    """``value`` (a sequence of numbers, e.g. a list, tuple or 1-D array) as a non-empty tuple of floats in
    [0, 1]. A str (even ``"0.5"``), a bare number or a non-numeric element is refused."""
    expected = "a list/tuple of numbers in [0, 1], e.g. (0.5, 0.7, 0.85)"
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"alpha_grid must be {expected}, got {type(value).__name__} {value!r}")
    grid = list(value)
    if not grid:
        raise ValueError("alpha_grid must not be empty")
    for a in grid:
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise ValueError(f"alpha_grid must be {expected}, got the element {a!r} in {value!r}")
        check_alpha(float(a), "every alpha_grid value")
    return tuple(dict.fromkeys(float(a) for a in grid))  # a repeated value is tried once


def alpha_key(alpha: float) -> str:
    """An alpha as a report key: ``f"{alpha:g}"`` ("0.5"), or its repr where that would round it
    (0.123456789), so that two grid values never share a key."""
    short = f"{float(alpha):g}"
    return short if float(short) == float(alpha) else repr(float(alpha))


def _check_local(key, value) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"set_local: the pattern must be a non-empty string, got {key!r}")
    if value == FP:
        return
    if not isinstance(value, dict) or not value or set(value) - {"weight", "activation"}:
        raise ValueError(f"set_local({key!r}): the value must be 'fp' or a dict with 'weight' and/or "
                         f"'activation', got {value!r}")
    try:
        Scheme(value.get("weight", "per_channel"), value.get("activation", "per_token"))
    except ValueError as exc:
        raise ValueError(f"set_local({key!r}): {exc}") from None


def pattern_matches(pattern: str, name: str, module=None) -> bool:
    """The one matching rule of include, exclude and set_local: ``pattern`` matches the module's full name
    (fnmatch: ``"model.layers.0.*"``), the end of it after a dot (``"q_proj"``, ``"self_attn.*"``,
    ``"layers.0.*"``), or the name of its class or a base class (``"Linear"``, ``"MixtralExperts"``)."""
    if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern):
        return True
    return module is not None and any(cls.__name__ == pattern for cls in type(module).__mro__)


def as_config(config, what: str) -> SmoothQuantConfig:
    """``config`` validated (None: the defaults); anything but a ``SmoothQuantConfig`` is a ValueError that
    says what to pass instead."""
    if config is None:
        return SmoothQuantConfig().validate()
    if isinstance(config, SmoothQuantConfig):
        return config.validate()
    if isinstance(config, dict):
        raise ValueError(f"{what}: config must be a SmoothQuantConfig, got a dict; build one with "
                         f"SmoothQuantConfig(**d) or SmoothQuantConfig.from_dict(d)")
    hint = (" (a tokenizer? pass it by keyword: tokenizer=...)" if callable(config) or hasattr(config, "encode")
            else "")
    raise ValueError(f"{what}: config must be a SmoothQuantConfig, got {type(config).__name__}{hint}")
