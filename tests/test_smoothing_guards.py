"""Statistics and smoothing under conditions a user creates without meaning to: statistics of another
smoothing or another copy of the model, statistics of a deeper model, a damaged statistics file, and a
near-dead channel in a float16 model."""
import copy
import json

import pytest
import torch

import sq_kernels as sq
from sq_kernels.calibration import ActStats, collect_act_stats, smoothing_id

from conftest import calib_tokens, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return sq.SmoothQuantConfig(progress=False, **kw)


def test_statistics_of_another_smoothing_are_refused(tmp_path):
    model = make_model("llama")
    data = calib_tokens(4, 16)
    stats = collect_act_stats(model, data, progress=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    report_a = sq.smooth_(a, stats, _cfg(alpha=0.0))
    report_b = sq.smooth_(b, stats, _cfg(alpha=1.0))
    assert smoothing_id(a) and smoothing_id(a) != smoothing_id(b)
    twin = copy.deepcopy(model)
    sq.smooth_(twin, stats, _cfg(alpha=0.0))
    assert smoothing_id(twin) == smoothing_id(a)  # smoothed alike: the same statistics fit both (a digest)
    assert report_a.stats.meta["smoothing_id"] == smoothing_id(a)
    with pytest.raises(ValueError, match="describe another smoothing"):
        sq.quantize_(a, _cfg(scheme="O3"), stats=report_b.stats)
    # its own statistics, also through a file and a save / load of the model, are taken
    report_a.stats.save(tmp_path / "a.safetensors")
    a.save_pretrained(tmp_path / "a")
    reloaded = type(a).from_pretrained(tmp_path / "a")
    assert smoothing_id(reloaded) == smoothing_id(a)
    assert sq.quantize_(reloaded, _cfg(scheme="O3"), stats=ActStats.load(tmp_path / "a.safetensors")).converted
    # statistics collected on the smoothed model describe this smoothing; a second smoothing outdates them
    after = collect_act_stats(a, data, progress=False)
    assert after.meta["smoothing_id"] == smoothing_id(a)
    sq.smooth_(a, after, _cfg(alpha=0.5))
    with pytest.raises(ValueError, match="describe another smoothing"):
        sq.quantize_(a, _cfg(scheme="O3"), stats=after)


def test_statistics_of_a_deeper_model_are_warned_about():
    deep, shallow = make_model("llama", num_hidden_layers=4), make_model("llama", num_hidden_layers=2)
    stats = collect_act_stats(deep, calib_tokens(2, 16), progress=False)
    with pytest.warns(UserWarning, match=r"hold \d+ module\(s\) this model does not have.*model\.layers\.2\."):
        sq.smooth_(shallow, stats, _cfg())


def test_damaged_statistics_metadata_is_a_value_error_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file
    model = make_model("llama")
    path = tmp_path / "s.safetensors"
    collect_act_stats(model, calib_tokens(2, 16), progress=False).save(path)
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    for field, value in (("tokens", json.dumps([1, 2])), ("meta", json.dumps([1])),
                         ("tokens", json.dumps({"x": "many"}))):
        bad = tmp_path / f"bad_{field}.safetensors"
        save_file(tensors, str(bad), metadata={**metadata, field: value})
        with pytest.raises(ValueError, match=rf"{bad.name}.*corrupt metadata"):
            ActStats.load(bad)
    with pytest.raises(ValueError, match="is a directory, not a file"):
        ActStats.load(tmp_path)


def test_a_fold_beyond_float16_range_is_refused_before_anything_changes():
    model = make_model("llama", dtype=torch.float16)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 1e-7  # a near-dead channel: s = S_MIN at alpha = 1
    stats = collect_act_stats(model, calib_tokens(4, 16), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"input_layernorm: smoothing with alpha=1.0 would take the weight of "
                                         r"channel 5 to .*beyond torch.float16's range"):
        sq.smooth_(model, stats, _cfg(alpha=1.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing folded
    sq.smooth_(model, stats, _cfg(alpha=0.5))  # a milder alpha fits
    assert all(torch.isfinite(p).all() for p in model.parameters())
