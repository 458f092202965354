"""Checkpoints under the cases a review found: rotary state a forward changed (dynamic RoPE), saves that fail
half-way (an earlier checkpoint must survive), an edited config loaded with verify=False, tampered buffers,
an edited table, and exports that would write bad scales or fail late."""
import json
import os
import warnings

import pytest
import torch

import sq_kernels as sq
from sq_kernels.checkpoint import QUANT_FILE, WEIGHTS_FILE, CheckpointError, _sha256_file, parse_size
from sq_kernels.export import export_compressed_tensors, load_compressed_tensors

from conftest import calib_tokens, make_model, quantized
from conftest import logits as _logits

pytestmark = pytest.mark.usefixtures("one_thread")

X = calib_tokens(2, 16, seed=3)


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _dynamic_rope_model():
    model = make_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False))
    return model


def test_dynamic_rope_state_is_saved_fresh_and_reloads(tmp_path):
    model = _dynamic_rope_model()
    rot = model.model.rotary_emb
    long = calib_tokens(1, rot.original_max_seq_len + 72, seed=7)
    _logits(model, long)  # a prompt past max_position_embeddings rescales the rotary table
    assert not torch.equal(rot.inv_freq, rot.original_inv_freq)
    sq.save_quantized(model, tmp_path / "grown", progress=False)
    loaded = sq.load_quantized(tmp_path / "grown")
    # the saved state is a fresh model's; a short prompt resets the original to the same
    assert torch.equal(loaded.model.rotary_emb.inv_freq, rot.original_inv_freq)
    assert torch.equal(_logits(loaded, X), _logits(model, X))
    # after that reset transformers registers one tensor under both names; saved as a fresh model holds them:
    # two tensors (long RoPE copies into inv_freq in place, which must not reach original_inv_freq)
    assert rot.inv_freq is rot.original_inv_freq
    sq.save_quantized(model, tmp_path / "reset", progress=False)
    again = sq.load_quantized(tmp_path / "reset")
    assert again.model.rotary_emb.inv_freq is not again.model.rotary_emb.original_inv_freq
    assert torch.equal(_logits(again, X), _logits(model, X))
    assert torch.equal(_logits(again, long), _logits(model, long))  # and grows again the same way


def test_a_failed_save_leaves_the_earlier_checkpoint_whole(tmp_path):
    model = quantized("llama")
    out = sq.save_quantized(model, tmp_path / "ckpt", progress=False)
    before = _files(out)
    architectures = model.config.architectures
    model.generation_config.temperature = 0.3  # without do_sample: transformers refuses to write it
    with pytest.raises(ValueError, match="generation_config is invalid, so it cannot be saved"):
        sq.save_quantized(model, out, progress=False)
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)  # no leftovers
    model.generation_config.temperature = 1.0
    model.model.norm.weight = torch.nn.Parameter(torch.empty(model.config.hidden_size, device="meta"))
    with pytest.raises(ValueError, match="hold no data .*model.norm.weight"):
        sq.save_quantized(model, out, progress=False)
    assert _files(out) == before
    w8a8 = model.model.layers[0].self_attn.q_proj  # a W8A8 buffer without data: named, not a raw .item() error
    scale = w8a8.weight_scale
    w8a8.weight_scale = torch.empty(scale.shape, device="meta")
    with pytest.raises(ValueError, match="hold no data .*q_proj.weight_scale"):
        sq.save_quantized(model, out, progress=False)
    w8a8.weight_scale = scale
    assert _files(out) == before
    assert model.config.architectures == architectures  # the user's config is not edited by a save
    torch.testing.assert_close(_logits(sq.load_quantized(out), X), _logits(quantized("llama"), X), rtol=0, atol=0)


def test_a_partly_converted_model_is_not_saved(tmp_path):
    model = quantized("llama")
    model.sq_partial_conversion = {"converted": ["model.layers.0.self_attn.q_proj"],
                                   "remaining": ["model.layers.1.mlp.down_proj"]}
    for save in (lambda: sq.save_quantized(model, tmp_path / "a", progress=False),
                 lambda: export_compressed_tensors(model, tmp_path / "b", progress=False)):
        with pytest.raises(ValueError, match=r"only partly converted .*1 module\(s\) left.*quantize_ again"):
            save()
    assert not (tmp_path / "a" / QUANT_FILE).exists() and not (tmp_path / "b").exists()


def test_resaving_a_model_without_generation_config_drops_the_earlier_one(tmp_path):
    out = sq.save_quantized(quantized("llama"), tmp_path / "c", progress=False)
    assert (out / "generation_config.json").is_file()
    other = quantized("llama")
    other.generation_config = None
    sq.save_quantized(other, out, progress=False)
    assert not (out / "generation_config.json").exists()
    sq.load_quantized(out)


def test_an_edited_rope_config_is_followed_with_verify_false(tmp_path):
    out = sq.save_quantized(quantized("llama"), tmp_path / "r", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 500000.0
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json does not match"):
        sq.load_quantized(out)
    with pytest.warns(UserWarning, match="edited after saving .*rotary_emb.inv_freq.*rebuilt from the edited config"):
        model = sq.load_quantized(out, verify=False)
    fresh = make_model("llama", rope_parameters=cfg["rope_parameters"])
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    # an edit that leaves the buffers as they were (use_cache) keeps the stored values, without a warning
    out2 = sq.save_quantized(quantized("llama"), tmp_path / "u", progress=False)
    cfg = json.loads((out2 / "config.json").read_text())
    cfg["use_cache"] = False
    (out2 / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_logits(sq.load_quantized(out2, verify=False), X), _logits(quantized("llama"), X))


def _tamper(out, key, value):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(out / WEIGHTS_FILE))
    tensors[key] = value
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=metadata)
    meta = json.loads((out / QUANT_FILE).read_text())
    meta["weights_sha256"] = _sha256_file(out / WEIGHTS_FILE)  # as if saved so: only the content checks are left
    (out / QUANT_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("key,value,message", [
    ("model.rotary_emb.inv_freq", torch.full((8,), float("nan")), "inv_freq: the stored buffer holds NaN or Inf"),
    ("model.rotary_emb.inv_freq", torch.ones(3), r"inv_freq: stored shape \(3,\), the model expects \(8,\)"),
    ("model.embed_tokens.weight", torch.ones(128, 64, dtype=torch.int32), "stored dtype torch.int32"),
])
def test_tampered_tensors_are_named(tmp_path, key, value, message):
    out = sq.save_quantized(quantized("llama"), tmp_path / "t", progress=False)
    _tamper(out, key, value)
    with pytest.raises(CheckpointError, match=message):
        sq.load_quantized(out)


def test_an_edited_table_is_named_before_the_model_is_built(tmp_path):
    out = sq.save_quantized(quantized("llama"), tmp_path / "e", progress=False)
    meta = json.loads((out / QUANT_FILE).read_text())
    meta["architecture"] = "GPT2LMHeadModel"
    (out / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="quantization table .* was modified after saving"):
        sq.load_quantized(out)
    (out / QUANT_FILE).write_bytes(b"\xff\xfe{not utf-8")
    with pytest.raises(CheckpointError, match="sq_quantization.json is corrupt \\(not UTF-8 text\\)"):
        sq.load_quantized(out)
    meta["architecture"], meta["format_version"] = "LlamaForCausalLM", True
    (out / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="invalid format_version True"):
        sq.load_quantized(out)


def test_export_refuses_bad_scales_and_cleans_up_after_a_late_failure(tmp_path):
    model = quantized("llama")
    model.model.layers[0].self_attn.q_proj.weight_scale[3] = float("inf")
    with pytest.raises(CheckpointError, match="export: scale 'model.layers.0.self_attn.q_proj.weight_scale' holds NaN"):
        export_compressed_tensors(model, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan").exists()

    model = quantized("llama")

    class Failing:
        def save_pretrained(self, path):
            raise OSError("disk full")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(model, empty, tokenizer=Failing(), progress=False)
    assert empty.is_dir() and not any(empty.iterdir())  # the user's (empty) directory stays; nothing in it
    export_compressed_tensors(model, empty, progress=False)  # so trying again works
    assert torch.equal(_logits(load_compressed_tensors(empty), X), _logits(model, X))


@pytest.mark.parametrize("config,message", [
    ("{not json", "config.json is not JSON text"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"quantization_config": "int8"}', "quantization_config must be an object"),
    ('{"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized", '
     '"config_groups": {"g": 3}}}', "config_groups must map group names to objects"),
])
def test_malformed_compressed_tensors_configs_are_named(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=message):
        load_compressed_tensors(tmp_path)


@pytest.mark.parametrize("size", ["inf", "1e400", "INFINITY", "nan"])
def test_parse_size_refuses_what_is_not_a_size(size):
    with pytest.raises(ValueError, match="max_shard_size must be"):
        parse_size(size)


def test_a_save_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        sq.save_quantized(quantized("llama"), target, progress=False)
    assert target.read_text() == "mine"
    assert os.path.isfile(target)
