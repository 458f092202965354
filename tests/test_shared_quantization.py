"""Linears that read one tensor (q/k/v of a norm's output, gate/up) quantize it once: within one call of the
module that runs them (a sharing scope: self_attn, mlp), the first W8A8Linear quantizes and the others reuse
its int8 copy while the input is the same object, unmodified, on the same stream, with the same dynamic
scheme. Results are bitwise those of quantizing in every linear."""
import collections
import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch

import sq_kernels as sq
from sq_kernels.nn import _quant, shared_activation_quantization, sharing_scope

from conftest import calib_tokens, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _op_counts(fn):
    with torch.profiler.profile() as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("sq_kernels::quantize"))


def _linears(n=3, k=64, activation="per_token", seed=0):
    torch.manual_seed(seed)
    return [sq.W8A8Linear.from_linear(torch.nn.Linear(k, 32 + 16 * i), activation=activation) for i in range(n)]


@pytest.mark.parametrize("scheme,per_layer", [("W8A8", 4), ("O2", 4), ("O3", 7)])
def test_a_model_quantizes_each_shared_input_once_and_gives_the_same_logits(scheme, per_layer):
    model = make_model("llama")
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False, scheme=scheme))
    x = calib_tokens(2, 16, seed=3)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        shared = _op_counts(lambda: model(x))
        got = model(x).logits
        with shared_activation_quantization(False):
            alone = _op_counts(lambda: model(x))
            want = model(x).logits
        twice = _op_counts(lambda: (model(x), model(x)))
    # q/k/v share one quantization, gate/up another; o_proj and down_proj have inputs of their own. A static
    # scale belongs to one linear (O3): nothing is shared there. Two forwards share nothing with each other.
    assert sum(shared.values()) == per_layer * layers, shared
    assert sum(alone.values()) == 7 * layers, alone
    assert sum(twice.values()) == 2 * per_layer * layers, twice
    assert torch.equal(got, want)
    assert _quant._state.slot.value is None and not _quant._state.scopes  # nothing held after the forward


def test_loaded_copied_and_pickled_models_share_too(tmp_path):
    model = make_model("llama")
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False))
    sq.save_quantized(model, tmp_path, progress=False)
    x = calib_tokens(2, 16, seed=3)
    for m in (sq.load_quantized(tmp_path), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert sum(_op_counts(lambda: m(x)).values()) == 4 * model.config.num_hidden_layers
            assert torch.equal(m(x).logits, model(x).logits)


def test_outside_a_scope_nothing_is_shared():
    a, b, _ = _linears()
    x = torch.randn(5, 64)
    assert sum(_op_counts(lambda: (a(x), b(x))).values()) == 2
    with sharing_scope():
        assert sum(_op_counts(lambda: (a(x), b(x))).values()) == 1
    assert _quant._state.slot.value is None  # the scope's end drops the int8 copy


def test_writes_the_version_counter_cannot_see_do_not_reach_a_later_call():
    # x.data.mul_ does not bump x's version counter: across calls that are not in one scope, nothing is reused
    a, b, _ = _linears()
    x = torch.randn(5, 64)
    with sharing_scope():
        a(x)
    x.data.mul_(3.0)
    with shared_activation_quantization(False):
        want = b(x.clone())
    with sharing_scope():
        assert torch.equal(b(x), want)


def test_a_change_in_place_within_a_scope_is_seen():
    a, b, _ = _linears()
    x = torch.randn(5, 64)
    with sharing_scope():
        a(x)
        x.mul_(3.0)  # bumps the version counter: b must quantize the new values
        with shared_activation_quantization(False):
            want = b(x.clone())
        assert torch.equal(b(x), want)
        view = x[:, :]
        a(x)
        view.add_(1.0)  # through a view: the version counter is shared with the base
        with shared_activation_quantization(False):
            want = b(x.clone())
        assert torch.equal(b(x), want)


def test_another_tensor_with_equal_values_or_another_scheme_is_not_mixed_up():
    a, b, _ = _linears()
    (t,) = _linears(1, activation="per_tensor", seed=1)
    x = torch.randn(4, 64)
    with sharing_scope():
        a(x)
        with shared_activation_quantization(False):
            want_tensor = t(x)
        assert torch.equal(t(x), want_tensor)  # per-tensor after per-token on the same x: quantized again
        counts = _op_counts(lambda: (a(x), b(x), t(x), a(x.clone())))
    assert counts == {"sq_kernels::quantize_per_token": 2, "sq_kernels::quantize_per_tensor_dynamic": 1}, counts


def test_an_inner_scope_does_not_reuse_an_outer_scopes_quantization():
    a, b, _ = _linears()
    x = torch.randn(3, 64)
    with sharing_scope():
        a(x)
        with sharing_scope():
            assert sum(_op_counts(lambda: b(x)).values()) == 1


def test_the_int8_copy_dies_with_its_input():
    a, _, _ = _linears()
    x = torch.randn(7, 64)
    with torch.no_grad(), sharing_scope():
        a(x)
        slot = _quant._state.slot
        held = weakref.ref(slot.value[0])
        assert held() is not None
        del x
        gc.collect()
        assert held() is None and slot.ref is None and slot.value is None


def test_inference_mode_and_other_threads_quantize_for_themselves():
    a, b, _ = _linears()
    with torch.inference_mode(), sharing_scope():
        x = torch.randn(3, 64)
        counts = _op_counts(lambda: (a(x), b(x)))
    assert sum(counts.values()) == 2  # no version counter on inference tensors: nothing reused
    x = torch.randn(3, 64)
    seen = {}

    def other():
        with sharing_scope():
            seen["counts"] = _op_counts(lambda: b(x))
        seen["enabled"] = _quant._state.enabled

    with sharing_scope():
        a(x)
        with shared_activation_quantization(False):  # this thread's switch, not the other's
            t = threading.Thread(target=other)
            t.start()
            t.join()
    assert sum(seen["counts"].values()) == 1 and seen["enabled"] is True  # a thread has its own state
    with pytest.raises(ValueError, match="enabled must be True or False"):
        with shared_activation_quantization(1):
            pass
