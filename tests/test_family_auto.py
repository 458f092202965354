"""``family="auto"``: the smoothing table inferred from the model. It must rebuild every hand-written table
exactly, give SmoothQuant's accuracy on architectures that have none, and refuse what cannot be smoothed."""
import copy

import pytest
import torch
import transformers as T

import sq_kernels as sq
from sq_kernels.cli import main
from sq_kernels.families import UnsupportedModelError, decoder_layers, family_of
from sq_kernels.families.auto import infer_family

from conftest import (FAMILIES, NEWER_FAMILIES, VOCAB, calib_tokens, make_model, naive_logits, plant_outliers,
                      sqnr)

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(vocab_size=VOCAB, initializer_range=0.08, hidden_size=64, num_attention_heads=4,
              max_position_embeddings=128)
UNREGISTERED = {  # architectures without a table here
    "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=256, num_hidden_layers=2, **COMMON),
    "stablelm": lambda: T.StableLmConfig(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4, **COMMON),
    "granite": lambda: T.GraniteConfig(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, **COMMON),
    "cohere": lambda: T.CohereConfig(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4,
                                     pad_token_id=0, **COMMON),
    "starcoder2": lambda: T.Starcoder2Config(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
                                             **COMMON),
    "gptj": lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=16, vocab_size=VOCAB, n_positions=128,
                                 initializer_range=0.08),
}


def _table(model, spec, pairs=False):
    out = {}
    for name, layer in decoder_layers(model, spec):
        for g in spec.active_groups(model.config, fold_linear_pairs=pairs):
            if g.present(layer):
                out.setdefault(name, set()).add((g.kind, g.source, frozenset(g.targets), g.weight_offset))
    return out


@pytest.mark.parametrize("family", FAMILIES + NEWER_FAMILIES)
def test_inference_rebuilds_every_hand_written_table(family):
    # norm -> linears per layer, Gemma's (1 + w) norms, MoE routers and experts, dense and sparse layers,
    # Qwen2-MoE's shared expert and its gate, Falcon's one norm feeding attention and MLP
    model = make_model(family)
    registered, inferred = family_of(model), infer_family(model)
    assert inferred.layers == registered.layers
    assert _table(model, inferred) == _table(model, registered)
    assert inferred.linear_pairs == ()  # looked for only when asked
    paired = infer_family(model, pairs=True)
    assert _table(model, paired, pairs=True) == _table(model, registered, pairs=True)  # v->o, up->down, fc1->fc2
    assert inferred.extra["notes"] == []
    assert infer_family(model) is inferred  # cached per model


def _unregistered(arch, outliers=True):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(UNREGISTERED[arch]()).eval()
    if outliers:
        plant_outliers(model, spec=infer_family(model))
    return model


@pytest.mark.parametrize("arch", list(UNREGISTERED))
def test_architectures_without_a_table(arch, capsys):
    fp = _unregistered(arch)
    with pytest.raises(UnsupportedModelError, match="family='auto'"):
        family_of(fp)
    x = calib_tokens(4, 32, seed=7)
    with torch.no_grad():
        ref = fp(x).logits
    smoothed = copy.deepcopy(fp)
    stats = sq.collect_act_stats(smoothed, calib_tokens(), progress=False)
    report = sq.smooth_(smoothed, stats, sq.SmoothQuantConfig(family="auto", progress=False))
    assert report.family.startswith("auto (") and report.groups
    with torch.no_grad():
        assert torch.allclose(smoothed(x).logits, ref, rtol=1e-4, atol=1e-4)  # neutral
    sq.quantize_(smoothed, sq.SmoothQuantConfig(family="auto", progress=False), stats=report.stats)
    with torch.no_grad():
        sq_db, naive_db = sqnr(ref, smoothed(x).logits), sqnr(ref, naive_logits(fp, x))
    with capsys.disabled():
        print(f"\n[SQNR] {arch:10s} (family='auto') SmoothQuant W8A8 {sq_db:6.2f} dB | naive W8A8 {naive_db:6.2f} dB")
    assert sq_db >= 20.0 and sq_db >= naive_db + 10.0
    # with the inferred linear pairs too: still neutral, and still as accurate
    paired = copy.deepcopy(fp)
    cfg = sq.SmoothQuantConfig(family="auto", fold_linear_pairs=True, progress=False)
    pair_report = sq.smooth_(paired, sq.collect_act_stats(paired, calib_tokens(), progress=False), cfg)
    pairs = len(pair_report.groups) - len(report.groups)
    with torch.no_grad():
        assert torch.allclose(paired(x).logits, ref, rtol=1e-4, atol=1e-4)
    sq.quantize_(paired, cfg, stats=pair_report.stats)
    with torch.no_grad():
        pair_db = sqnr(ref, paired(x).logits)
    with capsys.disabled():
        print(f"[SQNR] {arch:10s} (family='auto', +{pairs} linear-pair folds) SmoothQuant W8A8 {pair_db:6.2f} dB")
    assert pair_db >= 20.0 and pair_db >= naive_db + 10.0


def test_what_cannot_be_smoothed_is_refused_with_the_reason():
    # OLMo's LayerNorm has no weight to fold s into; OLMo 2 normalises after the sublayers (post-norm)
    for config in (T.OlmoConfig(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4, pad_token_id=0,
                                **COMMON),
                   T.Olmo2Config(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4, pad_token_id=0,
                                 **COMMON)):
        model = T.AutoModelForCausalLM.from_config(config).eval()
        with pytest.raises(ValueError, match="found no norm feeding linears.*smooth=False"):
            infer_family(model)


def test_a_norm_that_smoothing_would_break_is_dropped():
    # OPT with do_layer_norm_before=False: each norm's output is also the residual, so folding 1/s into it
    # changes the layer's output; the proof on a smoothed copy catches it
    model = make_model("opt", outliers=False, do_layer_norm_before=False)
    with pytest.raises(ValueError, match="changed the layer's output"):
        infer_family(model)


def test_a_norm_read_by_a_module_smoothing_cannot_compensate():
    model = make_model("llama", outliers=False)
    layer = model.model.layers[1]
    layer.self_attn.q_proj = torch.nn.Sequential(torch.nn.Tanh(), layer.self_attn.q_proj)  # tanh(x) before q
    spec = infer_family(model)
    notes = " ".join(spec.extra["notes"])
    assert "model.layers.1.input_layernorm: also read by self_attn.q_proj.0 (Tanh)" in notes
    groups = {(g.source, g.targets): g for g in spec.groups}
    attn = groups[("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    assert not attn.present(layer) and attn.present(model.model.layers[0])  # smoothed in layer 0 only


def test_config_and_cli(tmp_path, tokenizer):
    config = sq.SmoothQuantConfig(family="auto")
    assert sq.SmoothQuantConfig.from_dict(config.to_dict()).family == "auto"
    with pytest.raises(ValueError, match="family must be None, 'auto' or a sq_kernels.families.FamilySpec"):
        sq.SmoothQuantConfig(family="llama")
    model_dir, out = tmp_path / "neox", tmp_path / "q"
    _unregistered("gpt_neox").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["quantize", str(model_dir), str(out), "--data", str(tmp_path / "calib.txt"), "--num-samples", "4",
            "--seq-len", "32", "--no-progress"]
    assert main(args) == 2  # no table: the one-line error names --family auto
    assert main(args + ["--family", "auto"]) == 0
    loaded = sq.load_quantized(out)
    assert isinstance(loaded.gpt_neox.layers[0].attention.query_key_value, sq.W8A8Linear)
