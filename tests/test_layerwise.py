"""Layer-by-layer runs (``sq_kernels.layerwise``): calibration of a model one decoder layer at a time on
another device, and the alpha search's per-layer inputs.

Without a second device here, the layer-by-layer path is forced onto the CPU (``device`` = the model's
device would otherwise take the whole-model path): recording, walking and the tail then run exactly as
they do with ``device="cuda"``, except that no tensor moves. The moves themselves are checked with the
meta device (bookkeeping) and, on a GPU machine, by ``tests/kernels/test_layerwise_cuda.py``."""
import copy

import pytest
import torch
import transformers

import sq_kernels as sq
import sq_kernels.calibration as calibration
from sq_kernels.families import decoder_layers, family_of
from sq_kernels.layerwise import LayerwiseRun, _Moved

from conftest import FAMILIES, MULTIMODAL, NEWER_FAMILIES, VOCAB, calib_tokens, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _CopyingMover(_Moved):
    """Moves every weight to a fresh copy on the CPU: the stand-in for a second device."""

    def needs_move(self, t):
        return True

    def move(self, t):
        return t.clone()


class _CopyingRun(LayerwiseRun):
    mover = _CopyingMover


def _force_layerwise(monkeypatch):
    """collect_act_stats(device=...) and the alpha search run layer by layer on the CPU, every layer (and
    the shell) on copies of its weights while it runs, as they would be on a GPU."""
    def runner(model, batches, device, family, what):
        if device is None:
            return None
        layers = decoder_layers(model, family_of(model, family))
        return _CopyingRun(model, layers, batches, "cpu", calibration.run_model)
    monkeypatch.setattr(calibration, "_layerwise_runner", runner)
    import sq_kernels.smooth as smooth
    monkeypatch.setattr(smooth, "_layerwise_runner", runner)


def _snapshot(model):
    return ({n: (p, p.data_ptr(), p.device) for n, p in model.named_parameters()},
            {n: (b, b.data_ptr()) for n, b in model.named_buffers()})


def _assert_unchanged(model, snapshot):
    params, buffers = snapshot
    now_params, now_buffers = _snapshot(model)
    assert now_params.keys() == params.keys() and now_buffers.keys() == buffers.keys()
    for n, (p, ptr, dev) in params.items():
        assert now_params[n][0] is p and now_params[n][1] == ptr and now_params[n][2] == dev, n
    for n, (b, ptr) in buffers.items():
        assert now_buffers[n][0] is b and now_buffers[n][1] == ptr, n
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__], "a stub was left behind"


@pytest.mark.parametrize("family", FAMILIES + NEWER_FAMILIES + MULTIMODAL)
def test_layer_by_layer_statistics_equal_a_whole_model_run(family, monkeypatch):
    # every observed module (lm_head through the tail pass, MoE routers and experts, their down_proj inputs)
    # gets bitwise the statistics of a whole-model run, over the same tokens
    model = make_model(family)
    data = calib_tokens(6, 24)
    whole = sq.collect_act_stats(model, data, batch_size=2, progress=False)
    snapshot = _snapshot(model)
    _force_layerwise(monkeypatch)
    layered = sq.collect_act_stats(model, data, batch_size=2, progress=False, device="cpu")
    assert layered.names() == whole.names()
    for name in whole.names():
        assert torch.equal(layered[name], whole[name]), name
        assert layered.tokens[name] == whole.tokens[name], name
    _assert_unchanged(model, snapshot)


def _gemma3_mixed_layers():
    # six layers: five sliding-window ones (window 4, local rotary base) and one global one
    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=128, pad_token_id=0, vocab_size=VOCAB, sliding_window=4,
        initializer_range=0.08)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_every_layer_runs_with_its_own_arguments():
    # the walk reproduces each layer's output of a whole-model forward, also where layers take different
    # masks and rotary tables (Gemma 3's sliding-window and global layers), which one layer's recorded
    # arguments reused for all would not
    model = _gemma3_mixed_layers()
    layers = decoder_layers(model, family_of(model))
    x = calib_tokens(2, 12)
    expected, seen = {}, {}
    hooks = [layer.register_forward_hook(lambda m, a, k, out, name=name: expected.__setitem__(name, out),
                                         with_kwargs=True) for name, layer in layers]
    try:
        with torch.no_grad():
            model(x, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad(), LayerwiseRun(model, layers, [x], "cpu", calibration.run_model) as run:
        run.record()
        first, last = run.calls[0][0][1], run.calls[0][5][1]
        assert not torch.equal(first["position_embeddings"][0], last["position_embeddings"][0])
        run.walk(lambda name, layer, inputs, outputs: seen.__setitem__(name, outputs[0]))
    for name, _ in layers:
        assert torch.equal(seen[name], expected[name]), name


def test_alpha_search_on_a_model_mixing_layer_types():
    # alpha="auto" walks the layers with LayerwiseRun (the walk checked above): on the mixed Gemma 3 model it
    # picks an alpha for every layer and the result stays close to the floating-point model
    model = _gemma3_mixed_layers()
    fp = copy.deepcopy(model)
    data = calib_tokens(4, 12)
    report = sq.smoothquant(model, data, sq.SmoothQuantConfig(alpha="auto", alpha_grid=(0.3, 0.6), progress=False))
    assert len(report.smoothing.alphas) == 6 and set(report.smoothing.alphas.values()) <= {0.3, 0.6}
    x = calib_tokens(2, 12, seed=5)
    with torch.no_grad():
        ref, out = fp(x).logits, model(x).logits
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) < 0.2


def test_moves_are_undone_to_the_same_tensors():
    # the bookkeeping of the moves: everything moves (a tied weight once) and restore() puts back the very
    # same storage
    model = make_model("gemma")  # tied embeddings, a non-persistent buffer (embed_scale)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    snapshot = _snapshot(model)
    moved = _CopyingMover(list(model.modules()), torch.device("cpu"))
    assert len(moved.params) == len(list(model.parameters()))  # parameters() lists a tied weight once
    assert all(p.data_ptr() != snapshot[0][n][1] for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    moved.restore()
    _assert_unchanged(model, snapshot)
    assert not _Moved(list(model.modules()), torch.device("cpu")).params  # already there: nothing moves


def test_alpha_search_layer_by_layer_matches_the_whole_model_search(monkeypatch):
    data = calib_tokens(4, 16)
    config = dict(alpha="auto", alpha_grid=(0.4, 0.7), progress=False)
    whole = make_model("qwen3_moe")
    sq.smoothquant(whole, data, sq.SmoothQuantConfig(**config))
    layered = make_model("qwen3_moe")
    _force_layerwise(monkeypatch)
    report = sq.smoothquant(layered, data, sq.SmoothQuantConfig(calibration_device="cpu", **config))
    assert report.smoothing.search == whole.sq_smoothing["search"]
    x = calib_tokens(2, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(layered(x).logits, whole(x).logits)


def test_an_error_in_a_layer_leaves_the_model_as_it_was(monkeypatch):
    model = make_model("llama")
    snapshot = _snapshot(model)
    _force_layerwise(monkeypatch)
    mlp = model.model.layers[1].mlp

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")
    mlp.forward = broken
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            sq.collect_act_stats(model, calib_tokens(2, 16), progress=False, device="cpu")
    finally:
        del mlp.forward
    _assert_unchanged(model, snapshot)
    assert not model.training


def test_a_model_that_skips_layers_is_refused():
    model = make_model("llama")
    layers = decoder_layers(model, family_of(model))[:1] + [("extra", torch.nn.Identity())]
    with LayerwiseRun(model, layers, [calib_tokens(1, 8)], "cpu", calibration.run_model) as run:
        with pytest.raises(RuntimeError, match="called 1 of its 2 decoder layers"):
            run.record()


def test_device_arguments_are_checked():
    model = make_model("llama")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available"):
            sq.collect_act_stats(model, calib_tokens(2, 8), progress=False, device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        sq.collect_act_stats(model, calib_tokens(2, 8), progress=False, device="gpu0")
    with pytest.raises(ValueError, match="calibration_device must be"):
        sq.SmoothQuantConfig(calibration_device=[0])
    with pytest.raises(ValueError, match="calibration_device must be"):
        sq.SmoothQuantConfig(calibration_device="nowhere")
    assert sq.SmoothQuantConfig(calibration_device=1).calibration_device == "cuda:1"
    assert sq.SmoothQuantConfig(calibration_device=torch.device("cpu")).to_dict()["calibration_device"] == "cpu"


def test_device_elsewhere_needs_decoder_layers(monkeypatch):
    # a model without a smoothing table cannot be split into layers: the error says what to do
    import sq_kernels.checkpoint as checkpoint
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, 32))
    monkeypatch.setattr(checkpoint, "check_device", lambda device, what="device": torch.device("meta"))
    with pytest.raises(ValueError, match="one decoder layer at a time.*Move the model"):
        sq.collect_act_stats(model, calib_tokens(2, 8), progress=False, device="meta")
