"""Quantized checkpoints: save -> load -> forward is bitwise identical on every family and scheme, the
loaded model is its HF class with W8A8 modules, and damaged or mismatched checkpoints are rejected."""
import json

import pytest
import torch
from torch import nn

import sq_kernels as sq
from sq_kernels.checkpoint import FORMAT_VERSION, QUANT_FILE, WEIGHTS_FILE, CheckpointError, read_quantization_config
from sq_kernels.nn import W8A8Experts, W8A8Linear

from conftest import FAMILIES, calib_tokens, make_model
from conftest import logits as _logits, quantized as _quantized

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise(family, tmp_path):
    model = _quantized(family)
    x = calib_tokens(2, 16, seed=3)
    sq.save_quantized(model, tmp_path)
    loaded = sq.load_quantized(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    kinds = {n: type(m) for n, m in loaded.named_modules() if isinstance(m, (W8A8Linear, W8A8Experts))}
    assert kinds == {n: type(m) for n, m in model.named_modules() if isinstance(m, (W8A8Linear, W8A8Experts))}
    # the quantized linears hold int8 weights only: no floating-point copy was materialised
    for name, module in loaded.named_modules():
        if isinstance(module, W8A8Linear):
            assert module.weight.dtype == torch.int8 and not list(module.parameters())
    prompt = calib_tokens(1, 6, seed=4)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **kw), model.generate(prompt, **kw))


@pytest.mark.parametrize("scheme", ["O1", "O3"])
def test_round_trip_other_schemes(scheme, tmp_path):
    model = _quantized("mixtral", scheme=scheme)
    sq.save_quantized(model, tmp_path)
    loaded = sq.load_quantized(tmp_path)
    x = calib_tokens(2, 16, seed=3)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    meta = read_quantization_config(tmp_path)
    assert {d["activation"] for d in meta["modules"].values()} == {sq.config.SCHEMES[scheme][1]}
    if scheme == "O3":
        assert loaded.model.layers[0].mlp.experts.down_input_scale.shape == (4,)


def test_quantization_config_is_versioned_and_complete(tmp_path):
    model = _quantized("opt", alpha=0.6)
    sq.save_quantized(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", QUANT_FILE, WEIGHTS_FILE} <= files
    assert "model.safetensors" not in files  # a plain from_pretrained must not pick up int8 weights
    meta = json.loads((tmp_path / QUANT_FILE).read_text())
    assert meta["format"] == "sq_kernels.w8a8" and meta["format_version"] == 1
    assert meta["architecture"] == "OPTForCausalLM"
    assert meta["modules"]["model.decoder.layers.0.fc1"] == {
        "kind": "linear", "in_features": 64, "out_features": 256, "bias": True, "weight": "per_channel",
        "activation": "per_token"}
    assert meta["quantization"]["smoothing"]["alphas"] == {"model.decoder.layers.0": 0.6, "model.decoder.layers.1": 0.6}
    assert meta["tied"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    loaded = sq.load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight  # still tied
    assert loaded.sq_quantization["smoothing"]["alphas"]["model.decoder.layers.1"] == 0.6


def test_float16_model_round_trip(tmp_path):
    model = make_model("qwen2").half()
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False))
    sq.save_quantized(model, tmp_path)
    loaded = sq.load_quantized(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    assert loaded.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    x = calib_tokens(2, 8, seed=3)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


@pytest.mark.parametrize("family", ["llama", "mixtral", "opt"])
def test_load_in_another_dtype(family, tmp_path):
    model = _quantized(family)  # float32
    sq.save_quantized(model, tmp_path)
    loaded = sq.load_quantized(tmp_path, dtype="bfloat16")
    assert sq.load_quantized(tmp_path, dtype=torch.bfloat16).state_dict().keys() == loaded.state_dict().keys()
    kept = {n for n, m in loaded.named_modules() if isinstance(m, (W8A8Linear, W8A8Experts))}
    for name, t in loaded.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in kept:  # int8 weights and float32 scales / biases, as saved
            assert t.dtype == model.state_dict()[name].dtype, name
        else:
            assert t.dtype == torch.bfloat16, name
    for name, buf in loaded.named_buffers():  # non-persistent buffers (rotary frequencies) are not cast
        if name not in loaded.state_dict():
            assert buf.dtype == dict(model.named_buffers())[name].dtype, name
    if family == "opt":
        assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight  # still tied
    assert loaded.config.dtype == torch.bfloat16
    x = calib_tokens(2, 16, seed=3)
    got, want = _logits(loaded, x), _logits(model, x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).norm() < 0.05 * want.norm()


@pytest.mark.parametrize("dtype", ["int8", torch.int8, torch.float64, "fp16", 16])
def test_load_dtype_is_checked(dtype, tmp_path):
    sq.save_quantized(_quantized(), tmp_path)
    with pytest.raises(ValueError, match="dtype must be None, 'auto' or one of float16, bfloat16, float32"):
        sq.load_quantized(tmp_path, dtype=dtype)


def test_plain_from_pretrained_does_not_load_it(tmp_path):
    from transformers import AutoModelForCausalLM
    sq.save_quantized(_quantized(), tmp_path)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)


def _saved(tmp_path, family="llama"):
    sq.save_quantized(_quantized(family), tmp_path)
    return tmp_path


def test_corrupt_weights_rejected(tmp_path):
    path = _saved(tmp_path)
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        sq.load_quantized(path)


def test_truncated_weights_rejected_even_without_hash(tmp_path):
    path = _saved(tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        sq.load_quantized(path, verify=False)


def test_mismatched_config_rejected(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the quantized weights"):
        sq.load_quantized(path)


def test_weights_of_another_model_rejected(tmp_path):
    a, b = _saved(tmp_path / "a"), _saved(tmp_path / "b", "mistral")
    meta = json.loads((a / QUANT_FILE).read_text())
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())
    meta["weights_sha256"] = json.loads((b / QUANT_FILE).read_text())["weights_sha256"]
    (a / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="sq_model.safetensors belongs to another checkpoint"):
        sq.load_quantized(a)


def test_unknown_version_and_foreign_files_rejected(tmp_path):
    path = _saved(tmp_path)
    meta = json.loads((path / QUANT_FILE).read_text())
    (path / QUANT_FILE).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="newer sq_kernels"):
        sq.load_quantized(path)
    (path / QUANT_FILE).write_text(json.dumps({**meta, "format": "compressed-tensors"}))
    with pytest.raises(CheckpointError, match="format"):
        sq.load_quantized(path)
    (path / QUANT_FILE).write_text("{ not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        sq.load_quantized(path)
    (path / QUANT_FILE).unlink()
    with pytest.raises(CheckpointError, match="not an sq_kernels quantized model"):
        sq.load_quantized(path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory|no such directory"):
        sq.load_quantized(tmp_path / "nothing")


def test_nan_scale_never_saved_and_never_loaded(tmp_path):
    model = _quantized()
    model.model.layers[0].self_attn.q_proj.weight_scale[0] = float("nan")
    with pytest.raises(ValueError, match="weight_scale"):
        sq.save_quantized(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / QUANT_FILE).exists()
    # a file whose scale was damaged after saving (hash updated to match) is still refused
    from safetensors.torch import load_file, save_file
    path = _saved(tmp_path / "good")
    tensors = load_file(str(path / WEIGHTS_FILE))
    tensors["model.layers.1.mlp.up_proj.weight_scale"][3] = float("inf")
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "sq_kernels.w8a8", "format_version": "1"})
    with pytest.raises(CheckpointError, match="NaN, Inf"):
        sq.load_quantized(path, verify=False)


def test_saving_a_float_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no W8A8 modules"):
        sq.save_quantized(make_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="Hugging Face model"):
        sq.save_quantized(nn.Sequential(nn.Linear(16, 16)), tmp_path)


def _edit_quant_file(path, edit):
    meta = json.loads((path / QUANT_FILE).read_text())
    edit(meta)
    (path / QUANT_FILE).write_text(json.dumps(meta, indent=2))


def test_unavailable_device_is_not_called_a_corrupt_checkpoint(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", torch.device("cuda"), 0):
        with pytest.raises(ValueError, match=r"device '?cuda(:0)?'? is not available") as info:
            sq.load_quantized(path, device=device)
        assert not isinstance(info.value, CheckpointError) and "corrupt" not in str(info.value)
    for device in ("bogus", "gpu0", 1.5, [0]):
        with pytest.raises(ValueError, match=r"^device") as info:
            sq.load_quantized(path, device=device)
        assert "'cpu'" in str(info.value) and "corrupt" not in str(info.value)
    with pytest.raises(ValueError, match="meta"):
        sq.load_quantized(path, device="meta")
    # the device is checked before anything is read: even a missing checkpoint reports the device
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        sq.load_quantized(tmp_path / "nothing", device="cuda")
    assert sq.load_quantized(path, device=torch.device("cpu")) is not None


def test_only_safetensors_errors_are_called_corrupt(tmp_path, monkeypatch):
    import safetensors
    path = _saved(tmp_path)

    def failing_open(*args, **kwargs):
        raise RuntimeError("an unrelated failure")
    monkeypatch.setattr(safetensors, "safe_open", failing_open)
    with pytest.raises(RuntimeError, match="an unrelated failure"):
        sq.load_quantized(path)


@pytest.mark.parametrize("field, value, message", [
    ("in_features", None, "missing field 'in_features'"),
    ("out_features", "64", "field 'out_features' must be a positive integer"),
    ("in_features", 0, "field 'in_features' must be a positive integer"),
    ("bias", 1, "field 'bias' must be a bool"),
    ("activation", "bogus", "field 'activation' must be one of"),
    ("weight", None, "missing field 'weight'"),
    ("kind", "conv", "field 'kind' must be one of"),
])
def test_module_entry_schema_is_checked(tmp_path, field, value, message):
    path = _saved(tmp_path)
    name = "model.layers.0.self_attn.q_proj"

    def edit(meta):
        if value is None:
            del meta["modules"][name][field]
        else:
            meta["modules"][name][field] = value
    _edit_quant_file(path, edit)
    for read in (read_quantization_config, sq.load_quantized):
        with pytest.raises(CheckpointError, match=message) as info:
            read(path)
        assert QUANT_FILE in str(info.value) and repr(name) in str(info.value)


def test_experts_entry_schema_is_checked(tmp_path):
    path = _saved(tmp_path, "mixtral")
    _edit_quant_file(path, lambda meta: meta["modules"]["model.layers.1.mlp.experts"].pop("num_experts"))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.experts': missing field 'num_experts'"):
        sq.load_quantized(path)


@pytest.mark.parametrize("weights_file", ["../other/sq_model.safetensors", "/etc/passwd", "sub/sq_model.safetensors",
                                          "..", "sub\\sq_model.safetensors", "C:model.safetensors", "", 7])
def test_weights_file_must_be_a_plain_name_in_the_directory(tmp_path, weights_file):
    path = _saved(tmp_path / "ckpt")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes())
    _edit_quant_file(path, lambda meta: meta.update(weights_file=weights_file))
    with pytest.raises(CheckpointError, match="'weights_file' must be"):
        sq.load_quantized(path)


@pytest.mark.parametrize("family, module", [("llama", "model.layers.0.self_attn.q_proj"),
                                            ("mixtral", "model.layers.1.mlp.experts")])
def test_edited_quantization_table_rejected(tmp_path, family, module):
    """A scheme edit that keeps the stored tensors the same (dynamic per-token -> per-tensor) used to load
    silently as a different model. Edits that change the tensors are rejected by the tensor checks."""
    path = _saved(tmp_path, family)
    _edit_quant_file(path, lambda meta: meta["modules"][module].update(activation="per_tensor"))
    with pytest.raises(CheckpointError, match="quantization table .* was modified after saving"):
        sq.load_quantized(path)
    _edit_quant_file(path, lambda meta: meta["modules"][module].update(activation="per_token"))
    sq.load_quantized(path)  # restored: loads again


def test_quantization_table_hash_ignores_formatting(tmp_path):
    path = _saved(tmp_path)
    meta = json.loads((path / QUANT_FILE).read_text())
    meta["modules"] = dict(reversed(list(meta["modules"].items())))
    (path / QUANT_FILE).write_text(json.dumps(meta, sort_keys=True))  # other key order, no indentation
    sq.load_quantized(path)


def test_checkpoint_saved_without_table_hash_still_loads(tmp_path):
    """Checkpoints written before the table hash was stored in the weights metadata load as before."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sq_kernels.checkpoint import TABLE_DIGEST_KEY, _sha256_file
    model = _quantized()
    sq.save_quantized(model, tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    assert len(metadata.pop(TABLE_DIGEST_KEY)) == 64
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    _edit_quant_file(tmp_path, lambda meta: meta.update(weights_sha256=_sha256_file(weights)))
    loaded = sq.load_quantized(tmp_path)
    x = calib_tokens(2, 16, seed=3)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_compiled_model_is_saved_as_its_module(tmp_path):
    model = _quantized("llama")
    sq.save_quantized(torch.compile(model), tmp_path)  # nothing is compiled: only the wrapper is unwrapped
    meta = read_quantization_config(tmp_path)
    assert meta["architecture"] == "LlamaForCausalLM" and not any(n.startswith("_orig_mod") for n in meta["modules"])
    x = calib_tokens(2, 8, seed=3)
    assert torch.equal(_logits(sq.load_quantized(tmp_path), x), _logits(model, x))


def test_saving_beside_another_models_weights_is_refused(tmp_path):
    from sq_kernels.checkpoint import hf_weight_files
    fp_dir = tmp_path / "fp"
    make_model("llama").save_pretrained(fp_dir)
    before = {p.name: p.read_bytes() for p in fp_dir.iterdir()}
    with pytest.raises(ValueError, match=r"holds a model's weights \(model.safetensors\); save the quantized model"):
        sq.save_quantized(_quantized("llama"), fp_dir)
    assert {p.name: p.read_bytes() for p in fp_dir.iterdir()} == before  # its config.json was not replaced
    (tmp_path / "sharded").mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-card.md", "tokenizer.json"):
        (tmp_path / "sharded" / name).write_text("x")
    assert hf_weight_files(tmp_path / "sharded") == ["model-00001-of-00002.safetensors"]


def test_half_model_records_its_dtype_and_an_edited_config_loads_with_verify_false(tmp_path):
    model = make_model("qwen2").half()
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False))
    sq.save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "float16"
    config["use_cache"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="load with verify=False"):
        sq.load_quantized(tmp_path)
    loaded = sq.load_quantized(tmp_path, verify=False)
    assert loaded.config.use_cache is False
    x = calib_tokens(2, 8, seed=3)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_attention_implementation_is_chosen_at_load(tmp_path):
    model = _quantized("llama")
    sq.save_quantized(model, tmp_path)
    x = calib_tokens(2, 8, seed=3)
    for impl in ("eager", "sdpa"):
        loaded = sq.load_quantized(tmp_path, attn_implementation=impl)
        assert loaded.config._attn_implementation == impl
        assert torch.allclose(_logits(loaded, x), _logits(model, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bogus"):
        sq.load_quantized(tmp_path, attn_implementation="bogus")
