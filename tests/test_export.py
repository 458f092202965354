"""compressed-tensors export (the layout vLLM's INT8 W8A8 path and llm-compressor use) and import: the
layout is checked field by field, and export -> import gives back the same W8A8 model, bitwise."""
import json

import pytest
import torch
from safetensors.torch import load_file

import sq_kernels as sq
from sq_kernels.checkpoint import CheckpointError
from sq_kernels.export import export_compressed_tensors, load_compressed_tensors
from sq_kernels.nn import W8A8Linear

from conftest import calib_tokens, make_model
from conftest import logits as _logits, quantized as _quantized

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family,scheme", [("llama", "W8A8"), ("opt", "O3"), ("qwen2", "O1"), ("gemma2", "W8A8")])
def test_export_layout_and_round_trip(family, scheme, tmp_path):
    model = _quantized(family, scheme=scheme)
    export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["format"], q["quantization_status"]) == ("compressed-tensors", "int-quantized",
                                                                          "compressed")
    group = q["config_groups"]["group_0"]
    weights, acts = group["weights"], group["input_activations"]
    assert group["targets"] == ["Linear"] and q["ignore"] == ["lm_head"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"], weights["dynamic"]) == (8, "int", True, False)
    assert weights["strategy"] == ("channel" if scheme == "W8A8" else "tensor")
    assert (acts["strategy"], acts["dynamic"]) == (("tensor", False) if scheme == "O3" else ("token", True))
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            assert tensors[f"{name}.weight"].dtype == torch.int8
            assert torch.equal(tensors[f"{name}.weight"], m.weight)
            scale = tensors[f"{name}.weight_scale"]
            assert scale.dtype == torch.float32
            assert scale.shape == ((m.out_features, 1) if scheme == "W8A8" else (1,))
            assert (f"{name}.input_scale" in tensors) == (scheme == "O3")
    assert not any("inv_freq" in k for k in tensors)  # non-persistent buffers are not part of a checkpoint
    loaded = load_compressed_tensors(tmp_path / "ct")
    assert type(loaded) is type(model)
    x = calib_tokens(2, 16, seed=3)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_skeleton_has_meta_parameters_and_real_buffers(family):
    # the loader's model: no parameter allocated, every buffer a checkpoint does not store (rotary tables,
    # Gemma's embedding scale) computed by the modules themselves, as in a model built for real
    from sq_kernels.checkpoint import skeleton
    real = make_model(family, outliers=False)
    empty = skeleton(type(real), real.config, torch.device("cpu"))
    assert all(p.is_meta for p in empty.parameters())
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in real.named_parameters()]
    buffers = dict(real.named_buffers())
    assert dict(empty.named_buffers()).keys() == buffers.keys() and buffers
    for name, b in empty.named_buffers():
        assert not b.is_meta and torch.equal(b, buffers[name]), name
    assert not torch.nn.Module.register_parameter.__name__.startswith("register_on")  # the patch is undone


def test_falcon_linears_and_kept_ones_are_handled(tmp_path):
    # Falcon's layers are FalconLinear (an nn.Linear subclass); one kept in floating point goes to ignore
    model = make_model("falcon")
    config = sq.SmoothQuantConfig(progress=False).set_local("*.dense_4h_to_h", "fp")
    sq.smoothquant(model, calib_tokens(), config)
    export_compressed_tensors(model, tmp_path)
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["ignore"] == ["lm_head"] + [f"transformer.h.{i}.mlp.dense_4h_to_h" for i in range(2)]
    x = calib_tokens(2, 16, seed=3)
    assert torch.equal(_logits(load_compressed_tensors(tmp_path), x), _logits(model, x))


def test_export_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="per-tensor dynamic"):
        export_compressed_tensors(_quantized(scheme="O2"), tmp_path / "a")
    with pytest.raises(ValueError, match="MoE experts .* cannot be exported yet"):
        export_compressed_tensors(_quantized("mixtral"), tmp_path / "b")
    kept_experts = make_model("mixtral")
    sq.smoothquant(kept_experts, calib_tokens(),
                   sq.SmoothQuantConfig(progress=False).set_local("*.experts", "fp"))
    with pytest.raises(ValueError, match="MoE experts"):
        export_compressed_tensors(kept_experts, tmp_path / "b2")
    with pytest.raises(ValueError, match="lm_head is quantized"):
        export_compressed_tensors(_quantized(exclude=()), tmp_path / "b3")
    partly = make_model("llama")
    sq.smoothquant(partly, calib_tokens(), sq.SmoothQuantConfig(progress=False).set_local("*.q_proj", "fp"))
    with pytest.raises(ValueError, match="vLLM fuses q_proj, k_proj, v_proj into one layer"):
        export_compressed_tensors(partly, tmp_path / "b4")
    mixed = make_model("llama")
    config = sq.SmoothQuantConfig(progress=False).set_local("*.down_proj", weight="per_tensor")
    sq.smoothquant(mixed, calib_tokens(), config)
    with pytest.raises(ValueError, match="2 different schemes"):
        export_compressed_tensors(mixed, tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_compressed_tensors(_quantized(), tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_refuses_other_formats(tmp_path):
    export_compressed_tensors(_quantized(), tmp_path)
    config_file = tmp_path / "config.json"
    original = json.loads(config_file.read_text())
    for change, message in [
        (lambda q: q.update(format="pack-quantized"), "format 'pack-quantized'"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), "not symmetric 8-bit integers"),
        (lambda q: q["config_groups"]["group_0"]["input_activations"].update(strategy="tensor"), "not a scheme"),
        (lambda q: q.update(quant_method="gptq"), "no compressed-tensors quantization_config"),
    ]:
        edited = json.loads(json.dumps(original))
        change(edited["quantization_config"])
        config_file.write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=message):
            load_compressed_tensors(tmp_path)


def test_import_reads_the_variants_other_writers_produce(tmp_path):
    from safetensors.torch import save_file
    model = _quantized()
    x = calib_tokens(2, 16, seed=3)
    want = _logits(model, x)
    export_compressed_tensors(model, tmp_path / "ct")
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    # symmetric zero points, as some versions write them, are accepted; shards named by an index are read,
    # and a stale model.safetensors beside them is not
    with_zp = dict(tensors)
    with_zp["model.layers.0.mlp.up_proj.weight_zero_point"] = torch.zeros(128, 1, dtype=torch.int8)
    names = sorted(with_zp)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: with_zp[k] for k in keys}, str(tmp_path / "ct" / file))
    (tmp_path / "ct" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    stale = dict(tensors)
    stale["model.layers.0.mlp.up_proj.weight_scale"] = stale["model.layers.0.mlp.up_proj.weight_scale"] * 2
    save_file(stale, str(tmp_path / "ct" / "model.safetensors"))
    assert torch.equal(_logits(load_compressed_tensors(tmp_path / "ct"), x), want)
    # a "re:" ignore is a prefix match (re.match), as in compressed-tensors and vLLM
    config_file = tmp_path / "ct" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["ignore"] = ["re:lm_"]
    config_file.write_text(json.dumps(config))
    assert torch.equal(_logits(load_compressed_tensors(tmp_path / "ct"), x), want)
    # damaged scales are refused, not run
    bad = dict(tensors)
    bad["model.layers.1.self_attn.o_proj.weight_scale"][3] = float("nan")
    (tmp_path / "ct" / "model.safetensors.index.json").unlink()
    save_file(bad, str(tmp_path / "ct" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj.weight_scale holds NaN"):
        load_compressed_tensors(tmp_path / "ct")


def test_import_in_another_dtype_with_the_tokenizer_and_clear_errors(tmp_path, tokenizer):
    model = _quantized()
    export_compressed_tensors(model, tmp_path / "ct", tokenizer=tokenizer)
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    loaded = load_compressed_tensors(tmp_path / "ct", dtype="bfloat16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    with pytest.raises(CheckpointError, match="is a compressed-tensors checkpoint, not an sq_kernels one"):
        sq.load_quantized(tmp_path / "ct")
