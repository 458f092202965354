"""Plots for people who would rather look than read: what smoothing did to each group's channels, and
the per-layer SQNR of a quantized model. matplotlib is optional (``pip install matplotlib``); every
function checks for it first (``require_matplotlib``) so a CLI run can fail before its long work."""
from __future__ import annotations

import math
import numbers
import re
from pathlib import Path

import torch

TOP_DB = 200.0  # where an exact module's SQNR (inf) is drawn

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def require_matplotlib(what: str = "plotting"):
    """matplotlib's ``Figure`` class, or an ImportError that says how to get it. Figures are made without
    pyplot, so the user's backend and open figures (a notebook's) are left as they are."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"{what} needs matplotlib, which is not installed: pip install matplotlib") from exc
    return Figure


def check_plot_path(path, what: str = "plot") -> Path:
    """``path`` as a Path, after checking that matplotlib can write it (suffix) and its folder exists."""
    p = Path(path)
    if p.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"{what} {path}: the file name must end in one of {', '.join(PLOT_SUFFIXES)}")
    if not p.parent.is_dir():
        raise ValueError(f"{what}: the folder of {str(path)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{what}: {str(path)!r} is a directory, expected a file name")
    return p


def _outlier_ratio(v: torch.Tensor) -> float:
    """max / median of a channel profile: how far the worst channel sits above a typical one."""
    v = v.detach().to(torch.float64)
    med = float(v.median())
    return float(v.max()) / med if med > 0 else math.inf


def plot_smoothing(report, path, *, groups: list[str] | None = None, top: int = 3) -> Path:
    """What smoothing did, from a ``SmoothReport`` (``smooth_``'s return value).

    Top row: for every group, the activation's and the weight's outlier ratio (max / median of the
    per-channel abs-max) before and after smoothing, by group. Below, for ``groups`` (names as in
    ``report.vectors``; default: the ``top`` groups whose activations had the worst outliers), the
    per-channel abs-max of the activation and of the weight before and after: the paper's Figure 4.
    Returns the path written."""
    Figure = require_matplotlib("plot_smoothing")
    from matplotlib.ticker import MaxNLocator
    path = check_plot_path(path, "plot_smoothing")
    vectors = getattr(report, "vectors", None) or {}
    if not vectors:
        raise ValueError("plot_smoothing: the report has no smoothing vectors (it smoothed no group, or it was "
                         "read back from JSON, which keeps only the summary)")
    names = list(vectors)
    if groups is None:
        if not isinstance(top, int) or top < 0:
            raise ValueError(f"plot_smoothing: top must be an int >= 0, got {top!r}")
        groups = sorted(names, key=lambda n: _outlier_ratio(vectors[n]["act"]), reverse=True)[:top]
    else:
        if isinstance(groups, str):  # one group's name, not its characters
            groups = [groups]
        unknown = [g for g in groups if g not in vectors]
        if unknown:
            raise ValueError(f"plot_smoothing: unknown groups {unknown}; the report has {names[:6]}"
                             f"{' ...' if len(names) > 6 else ''}")
    rows = 1 + len(groups)
    fig = Figure(figsize=(13, 3.6 * rows))
    axes = fig.subplots(rows, 2, squeeze=False)
    x = range(len(names))
    for col, (key, label) in enumerate((("act", "activation"), ("weight", "weight"))):
        ax = axes[0][col]
        before = [_outlier_ratio(vectors[n][key]) for n in names]
        after = [_outlier_ratio(vectors[n][key] / vectors[n]["scale"] if key == "act"
                                else vectors[n][key] * vectors[n]["scale"]) for n in names]
        ax.plot(x, before, "o-", ms=3, label="before smoothing", color="tab:red")
        ax.plot(x, after, "o-", ms=3, label="after smoothing", color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(f"{label} outlier ratio (max / median channel abs-max) per group")
        ax.set_xlabel("smoothing group (model order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for row, name in enumerate(groups, start=1):
        v = vectors[name]
        s = v["scale"].detach().to(torch.float32).cpu()
        act, w = v["act"].detach().to(torch.float32).cpu(), v["weight"].detach().to(torch.float32).cpu()
        for col, (label, before, after) in enumerate((("activation |X|", act, act / s),
                                                      ("weight |W|", w, w * s))):
            ax = axes[row][col]
            ch = range(before.shape[0])
            ax.plot(ch, before.numpy(), lw=0.7, color="tab:red", label="before")
            ax.plot(ch, after.numpy(), lw=0.7, color="tab:blue", label="after")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_title(f"{name}: {label} per input channel (alpha={v['alpha']:g})", fontsize=9)
            ax.set_xlabel("input channel")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"SmoothQuant smoothing ({report.family}): {len(names)} groups")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, 'self_attn.q_proj')``; no index -> ``(None, name)``."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end():]


def plot_layer_sqnr(report: dict[str, float] | dict[str, dict[str, float]], path, *, title: str | None = None) -> Path:
    """SQNR (dB) by decoder layer, one line per kind of module (``q_proj``, ``down_proj``, ...), with the
    logits' SQNR as a dashed line, from ``layer_sqnr``'s report. Several reports (``{label: report}``, e.g.
    SmoothQuant and naive W8A8 of the same model) share the axes, one colour each. Returns the path written."""
    Figure = require_matplotlib("plot_layer_sqnr")
    from matplotlib import rcParams
    from matplotlib.ticker import MaxNLocator
    path = check_plot_path(path, "plot_layer_sqnr")
    if not isinstance(report, dict) or not report:
        raise ValueError("plot_layer_sqnr: report must be a non-empty dict from layer_sqnr")
    reports = report if all(isinstance(v, dict) for v in report.values()) else {"": report}
    for label, rep in reports.items():
        bad = [k for k, v in rep.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad or not rep:
            raise ValueError(f"plot_layer_sqnr: report {label!r} must map module names to SQNR in dB; "
                             f"got non-numbers for {bad[:4]}" if bad else f"plot_layer_sqnr: report {label!r} is empty")
    reports = {label: {k: float(v) for k, v in rep.items()} for label, rep in reports.items()}  # numpy floats too
    # an exact module (inf) plots at the top, not off the chart; a NaN or -inf one (a layer that overflowed: the
    # one to look at) at the bottom, marked with a red x, and counted in the title
    finite = [v for rep in reports.values() for v in rep.values() if math.isfinite(v)]
    floor = (min(finite) if finite else 0.0) - 5.0
    broken = []

    def shown(name, db):
        if math.isnan(db) or db == -math.inf:
            broken.append(name)
            return floor
        return min(db, TOP_DB)
    fig = Figure(figsize=(13, 5))
    ax = fig.subplots()
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^vDP*Xhp<>"
    last_layer = 0
    for ri, (label, rep) in enumerate(reports.items()):
        kinds: dict[str, list[tuple[int, float]]] = {}
        loose = []
        for name, db in rep.items():
            if name == "logits":
                continue
            layer, kind = _layer_and_kind(name)
            if layer is None:
                loose.append((name, db))
            else:
                kinds.setdefault(kind, []).append((layer, db))
                last_layer = max(last_layer, layer)
        for ki, (kind, points) in enumerate(kinds.items()):
            points.sort()
            xs = [p[0] for p in points]
            ys = [shown(kind, p[1]) for p in points]
            ax.plot(xs, ys, marker=markers[ki % len(markers)], ms=4, lw=1, alpha=0.85,
                    color=colours[(ki if len(reports) == 1 else ri) % len(colours)],
                    label=f"{label} {kind}".strip())
            bad = [(x, y) for x, y, (_, db) in zip(xs, ys, points) if not (math.isfinite(db) or db > 0)]
            if bad:
                ax.plot([b[0] for b in bad], [b[1] for b in bad], marker="x", ms=9, mew=2, ls="none", color="red")
        for name, db in loose:
            ax.plot([last_layer + 1], [shown(name, db)], marker="*" if math.isfinite(db) or db > 0 else "x", ms=10,
                    ls="none", color=colours[ri % len(colours)], label=f"{label} {name}".strip())
        if "logits" in rep:
            ax.axhline(shown("logits", rep["logits"]), ls="--", color=colours[ri % len(colours)],
                       label=f"{label} logits ({rep['logits']:.1f} dB)".strip())
    ax.set_xlabel("decoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title((title or "per-layer SQNR of the quantized model against the floating-point one")
                 + (f"\n{len(broken)} value(s) NaN or -inf (non-finite output), drawn at the bottom as red x"
                    if broken else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


__all__ = ["plot_smoothing", "plot_layer_sqnr", "require_matplotlib", "check_plot_path"]
