"""The config's rules and the conversion report under conditions a user creates without meaning to: a config
edited after quantizing, a broad set_local rule on a multimodal model, rules that can do nothing, a resumed
conversion, the model being a single linear, and SQNR reports with NaN or numpy values to plot."""
import copy
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sq_kernels as sq
from sq_kernels.config import Scheme, SmoothQuantConfig
from sq_kernels.nn import W8A8Linear, convert

from conftest import make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return SmoothQuantConfig(progress=False, **kw)


# ----------------------------------------------------------------------------------------------
# The recorded config is a copy
# ----------------------------------------------------------------------------------------------
def test_the_recorded_config_does_not_follow_later_edits(tmp_path):
    cfg = _cfg(smooth=False).set_local("model.layers.0.*", "fp")
    before = cfg.to_dict()
    model = make_model("llama")
    report = sq.quantize_(model, cfg)
    cfg.set_local("*.down_proj", activation="per_tensor")
    cfg.local["model.layers.0.*"] = {"weight": "per_tensor"}
    for recorded in (before, report.config, model.sq_quantization["config"]):
        assert recorded["local"] == {"model.layers.0.*": "fp"}
    sq.save_quantized(model, tmp_path / "q")
    loaded = sq.load_quantized(tmp_path / "q")
    assert loaded.sq_quantization["config"]["local"] == {"model.layers.0.*": "fp"}


def test_a_rule_dict_stays_the_callers():
    rule = {"activation": "per_tensor"}
    cfg = _cfg().set_local("*.q_proj", rule)
    other = _cfg(local={"*.k_proj": rule})
    rule["activation"] = "dynamic"  # an invalid edit of the caller's dict reaches neither config
    assert cfg.local["*.q_proj"] == other.local["*.k_proj"] == {"activation": "per_tensor"}
    cfg.validate()
    other.validate()


def test_local_takes_scheme_objects_and_errors_name_the_rule():
    assert _cfg(local={"*.q_proj": Scheme("per_tensor")}).local == {"*.q_proj": {"weight": "per_tensor",
                                                                               "activation": "per_token"}}
    with pytest.raises(ValueError, match=r"set_local\('\*\.down_proj'\): activation scheme must be one of"):
        _cfg().set_local("*.down_proj", activation="dynamic")
    with pytest.raises(ValueError, match=r"set_local\('\*\.down_proj'\): weight granularity must be one of"):
        _cfg(local={"*.down_proj": {"weight": "per_row"}})
    for data in (None, [("alpha", 0.5)]):
        with pytest.raises(ValueError, match="from_dict: data must be a dict"):
            SmoothQuantConfig.from_dict(data)


# ----------------------------------------------------------------------------------------------
# Which rules reach the family's keep-FP list
# ----------------------------------------------------------------------------------------------
def test_a_broad_rule_does_not_quantize_the_vision_tower():
    model = make_model("llava")
    outside = ("model.vision_tower.", "model.multi_modal_projector.")
    for pattern in ("*.self_attn.*", "*"):
        report = sq.quantize_(copy.deepcopy(model), _cfg(smooth=False).set_local(pattern, weight="per_tensor"))
        assert not [n for n in report.converted if n.startswith(outside)], pattern
        assert [n for n in report.converted if n.startswith("model.language_model.")], pattern
    # a rule aimed at the projector alone still reaches it (tests/test_conversion_guards.py)
    report = sq.quantize_(copy.deepcopy(model), _cfg(smooth=False).set_local("multi_modal_projector.*",
                                                                             weight="per_tensor"))
    assert "model.multi_modal_projector.linear_1" in report.converted


@pytest.mark.parametrize("family,pattern,reason", [
    ("llama", "lm_head", "excluded by pattern 'lm_head'"),
    ("mixtral", "model.layers.0.mlp.gate", "cannot be quantized"),
])
def test_a_scheme_rule_that_can_do_nothing_is_warned_about(family, pattern, reason):
    model = make_model(family)
    with pytest.warns(UserWarning, match=rf"set_local\('{re.escape(pattern)}', \.\.\.\) gives a scheme, but every "
                                         rf"module it matches stays in floating point.*{reason}"):
        sq.quantize_(model, _cfg(smooth=False).set_local(pattern, weight="per_tensor"))


# ----------------------------------------------------------------------------------------------
# The report of a resumed conversion; the model itself a linear
# ----------------------------------------------------------------------------------------------
def test_a_resumed_conversion_reports_every_w8a8_module_as_converted(monkeypatch):
    model = make_model("llama")
    real, calls = convert.build_module, []

    def failing(entry, stats=None):
        calls.append(entry.name)
        if len(calls) == 5:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(entry, stats)

    monkeypatch.setattr(convert, "build_module", failing)
    with pytest.raises(sq.nn.convert.PartialConversionError):
        sq.quantize_(model, _cfg(smooth=False))
    monkeypatch.setattr(convert, "build_module", real)
    report = sq.quantize_(model, _cfg(smooth=False))
    w8a8 = [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
    assert len(w8a8) == 14 and sorted(report.converted) == sorted(w8a8)
    assert set(report.kept) == {"lm_head"}
    assert sorted(model.sq_quantization["converted"]) == sorted(w8a8)
    assert set(report.converted.values()) == {"w8 per-channel / a8 dynamic per-token"}
    with pytest.raises(ValueError, match="is already quantized: 14 module"):
        sq.quantize_(model, _cfg(smooth=False))


def test_the_model_itself_being_a_linear_is_refused():
    lin = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"the model itself is a Linear.*nn\.Sequential"):
        sq.quantize_(lin, _cfg(smooth=False))
    assert list(lin.state_dict()) == ["weight", "bias"] and not list(lin.children())
    report = sq.quantize_(nn.Sequential(lin), _cfg(smooth=False))
    assert list(report.converted) == ["0"]


# ----------------------------------------------------------------------------------------------
# Plots of unusual SQNR reports
# ----------------------------------------------------------------------------------------------
def test_nan_and_numpy_sqnr_values_are_drawn(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional dependency (pip install matplotlib)")
    from sq_kernels import plots
    report = {"model.layers.0.mlp.down_proj": np.float32(30.0), "model.layers.1.mlp.down_proj": math.nan,
              "model.layers.2.mlp.down_proj": -math.inf, "model.layers.3.mlp.down_proj": math.inf,
              "logits": math.nan}
    from matplotlib.figure import Figure
    drawn, real_savefig = {}, Figure.savefig

    def capture(fig, path, **kw):
        ax = fig.axes[0]
        drawn["title"] = ax.get_title()
        drawn["lines"] = [(line.get_label(), list(map(float, line.get_ydata()))) for line in ax.get_lines()]
        return real_savefig(fig, path, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Figure.savefig = capture
        try:
            plots.plot_layer_sqnr(report, tmp_path / "sqnr.png")
        finally:
            Figure.savefig = real_savefig
    ys = dict(drawn["lines"])
    assert ys["mlp.down_proj"] == [30.0, 25.0, 25.0, plots.TOP_DB]  # NaN / -inf at the bottom, inf at the top
    assert ys["logits (nan dB)"] == [25.0, 25.0]
    assert "3 value(s) NaN or -inf" in drawn["title"]
    assert any(label.startswith("_") and y == [25.0, 25.0] for label, y in drawn["lines"])  # the red x marks


def test_one_group_name_is_a_group_not_its_characters(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional dependency (pip install matplotlib)")
    from sq_kernels import plots
    from sq_kernels.calibration import collect_act_stats
    from conftest import calib_tokens
    model = make_model("llama")
    report = sq.smooth_(model, collect_act_stats(model, calib_tokens(4, 16), progress=False), _cfg())
    group = next(iter(report.vectors))
    assert plots.plot_smoothing(report, tmp_path / "s.png", groups=group).is_file()
