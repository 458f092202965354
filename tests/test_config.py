"""``SmoothQuantConfig``: a bare string is one pattern, bad field types are refused with a ValueError naming
the field, the caller's objects are not modified, and ``set_local`` rules resolve as documented."""
import pytest
import torch
from torch import nn

import sq_kernels as sq
from sq_kernels.config import SmoothQuantConfig
from sq_kernels.nn import W8A8Linear

from conftest import calib_tokens, make_model


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_a_string_pattern_is_one_pattern(field):
    cfg = SmoothQuantConfig(**{field: "model.layers.1.*"})
    assert getattr(cfg, field) == ("model.layers.1.*",)
    assert getattr(SmoothQuantConfig(**{field: ["a.*", "b"]}), field) == ("a.*", "b")
    assert getattr(SmoothQuantConfig(**{field: ("a.*",)}), field) == ("a.*",)


def test_a_string_assigned_after_construction_is_one_pattern_too():
    cfg = SmoothQuantConfig()
    cfg.exclude = "lm_head"
    cfg.include = "model.*"
    cfg.validate()  # smoothquant / smooth_ / quantize_ call it
    assert cfg.exclude == ("lm_head",) and cfg.include == ("model.*",)


@pytest.mark.parametrize("field, value", [
    ("include", 5), ("include", None), ("include", {"a": 1}), ("include", b"lm_head"),
    ("exclude", [1]), ("exclude", ["lm_head", None]), ("exclude", [""]),
])
def test_bad_patterns_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SmoothQuantConfig(**{field: value})


@pytest.mark.parametrize("grid", ["abc", "0.5", ["a"], [0.5, "0.7"], 0.5, None, [True], [[0.5]], {"a": 0.5}])
def test_non_numeric_alpha_grid_names_the_field(grid):
    with pytest.raises(ValueError, match="alpha_grid"):
        SmoothQuantConfig(alpha="auto", alpha_grid=grid)


def test_alpha_grid_accepts_sequences_of_numbers():
    import numpy as np
    assert SmoothQuantConfig(alpha_grid=[0.5, 1]).alpha_grid == (0.5, 1.0)
    assert SmoothQuantConfig(alpha_grid=np.array([0.25, 0.75])).alpha_grid == (0.25, 0.75)
    with pytest.raises(ValueError, match="alpha_grid must not be empty"):
        SmoothQuantConfig(alpha_grid=[])
    with pytest.raises(ValueError, match="alpha_grid value"):
        SmoothQuantConfig(alpha_grid=[0.5, 1.5])


def test_local_must_be_a_dict_and_is_not_the_callers():
    with pytest.raises(ValueError, match="^local must be a dict"):
        SmoothQuantConfig(local=[("x", "fp")])
    rules = {"model.layers.0.*": "fp"}
    cfg = SmoothQuantConfig(local=rules)
    cfg.set_local("*.down_proj", activation="per_tensor")
    assert rules == {"model.layers.0.*": "fp"}


@pytest.mark.usefixtures("one_thread")
def test_exclude_string_keeps_lm_head_and_include_string_selects():
    """The audit's case: exclude="lm_head" became ('l', 'm', ...) and lm_head was quantized; include="x.*"
    became (..., '*') and matched every linear."""
    model = make_model("llama")
    sq.smoothquant(model, calib_tokens(), SmoothQuantConfig(exclude="lm_head", progress=False))
    assert type(model.lm_head) is nn.Linear
    model = make_model("llama")
    sq.smoothquant(model, calib_tokens(), SmoothQuantConfig(include="model.layers.1.*", progress=False))
    converted = {n for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    assert converted and all(n.startswith("model.layers.1.") for n in converted)


def test_docs_set_local_example_keeps_layer_0_in_fp():
    """docs/python_api.md: the "fp" pin of layer 0 is set last, so it wins over the down_proj scheme rule."""
    cfg = SmoothQuantConfig(alpha=0.85, scheme="O3")
    cfg.set_local("*.mlp.down_proj", activation="per_token")
    cfg.set_local("FalconLinear", "fp")
    cfg.set_local("model.layers.0.*", "fp")
    linear = torch.nn.Linear(16, 16)
    assert "kept in floating point" in cfg.resolve("model.layers.0.mlp.down_proj", linear)
    assert cfg.resolve("model.layers.1.mlp.down_proj", linear) == sq.config.Scheme("per_tensor", "per_token")
    assert cfg.resolve("model.layers.1.mlp.up_proj", linear) == sq.config.Scheme("per_tensor", "static")


def test_set_local_again_moves_the_rule_last():
    """Later rules win: setting a pattern again must make it the latest rule, not keep its old position."""
    cfg = SmoothQuantConfig()
    cfg.set_local("model.layers.0.*", activation="per_tensor")
    cfg.set_local("*.down_proj", "fp")
    cfg.set_local("model.layers.0.*", activation="per_token")
    assert list(cfg.local) == ["*.down_proj", "model.layers.0.*"]
    assert cfg.resolve("model.layers.0.mlp.down_proj", None) == sq.config.Scheme("per_channel", "per_token")


def test_to_dict_from_dict_round_trip():
    cfg = SmoothQuantConfig(include="model.*", exclude=["lm_head", "*.gate"], alpha_grid=[0.5, 0.8])
    cfg.set_local("*.down_proj", "fp")
    back = SmoothQuantConfig.from_dict(cfg.to_dict())
    assert (back.include, back.exclude, back.alpha_grid, back.local) == (
        ("model.*",), ("lm_head", "*.gate"), (0.5, 0.8), {"*.down_proj": "fp"})
