"""The W8A8 modules and the layer-by-layer runner under conditions a user creates without meaning to: an
expert calibration never reached, a floating-point state dict loaded into W8A8 modules, ``.type(half)``,
Ctrl-C in the middle of a forward, wrong inputs to the experts, a second walk over the layers."""

import pytest
import torch
from torch import nn

import sq_kernels as sq
from sq_kernels import calibration
from sq_kernels.families import decoder_layers, family_of
from sq_kernels.layerwise import LayerwiseRun
from sq_kernels.nn import W8A8Experts, W8A8Linear, _quant, shared_activation_quantization
from sq_kernels.nn.experts import experts_forward_float

from conftest import calib_tokens, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _experts(num_experts=4, hidden=64, inter=32, seed=0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    torch.manual_seed(seed)
    ex = MixtralExperts(MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                                      num_experts_per_tok=2))
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.1)
        ex.down_proj.normal_(0, 0.1)
    return ex


def _rel_err(out, ref):
    return float((out - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------------
# Static experts: an expert calibration never reached
# ----------------------------------------------------------------------------------------------
def test_an_expert_without_calibration_tokens_takes_the_largest_maximum_with_a_warning():
    ex = _experts()
    x = torch.randn(16, 64)
    weights = torch.full((16, 2), 0.5)
    down = torch.zeros(4)

    def observe(e, h):
        down[e] = torch.maximum(down[e], h.abs().max())
    experts_forward_float(ex, x, torch.tensor([[0, 1], [1, 2]] * 8), weights, observe)  # expert 3: no token
    assert down[3] == 0 and (down[:3] > 0).all()
    with pytest.warns(UserWarning, match=r"expert \[3\] got no calibration tokens.*it takes the largest"):
        q = W8A8Experts.from_experts(ex, activation="static", input_amax=x.abs().max(), down_input_amax=down)
    assert torch.equal(q.down_input_scale[3], q.down_input_scale[:3].max())
    only3 = (torch.full((16, 1), 3), torch.ones(16, 1))
    with torch.no_grad():
        ref, out = ex(x, *only3), q(x, *only3)
    assert _rel_err(out, ref) < 0.1  # before: the expert's output was ~1e-10, a relative error of 1.0
    with pytest.raises(ValueError, match="0 for every expert"):
        W8A8Experts.from_experts(ex, activation="static", input_amax=1.0, down_input_amax=torch.zeros(4))


def test_static_expert_maxima_are_checked_by_size():
    ex = _experts()
    with pytest.raises(ValueError, match="input_amax must be a number or a 1-element tensor.*got 4 elements"):
        W8A8Experts.from_experts(ex, activation="static", input_amax=torch.ones(4), down_input_amax=torch.ones(4))
    with pytest.raises(ValueError, match="down_input_amax must have 4 elements.*got 3"):
        W8A8Experts.from_experts(ex, activation="static", input_amax=1.0, down_input_amax=torch.ones(3))


def test_the_experts_check_their_input():
    q = W8A8Experts.from_experts(_experts())
    idx, w = torch.tensor([[0, 1]] * 6), torch.full((6, 2), 0.5)
    with pytest.raises(ValueError, match=r"W8A8Experts: input must have shape \[\.\.\., 64\], got \(6, 32\)"):
        q(torch.randn(6, 32), idx, w)
    with pytest.raises(ValueError, match="W8A8Experts: input must be a float16, bfloat16 or float32"):
        q(torch.randn(6, 64, dtype=torch.float64), idx, w)


def test_from_linear_names_the_module_in_the_constructors_errors():
    with pytest.raises(ValueError, match=r"^model\.layers\.3\.mlp\.down_proj: .*out_features=40"):
        W8A8Linear.from_linear(nn.Linear(64, 40), name="model.layers.3.mlp.down_proj")
    with pytest.raises(ValueError, match=r"^model\.layers\.3\.mlp\.down_proj: .*weight must be one of"):
        W8A8Linear.from_linear(nn.Linear(64, 32), weight="per_row", name="model.layers.3.mlp.down_proj")


# ----------------------------------------------------------------------------------------------
# dtypes kept: load_state_dict and .type()
# ----------------------------------------------------------------------------------------------
def test_a_float_weight_is_refused_by_load_state_dict_not_rounded_to_zero():
    lin = nn.Linear(64, 32)
    q = W8A8Linear.from_linear(lin)
    state = q.state_dict()
    state["weight"] = lin.weight.detach().clone()  # |w| < 1: it would copy into int8 as zeros
    target = W8A8Linear(64, 32)
    with pytest.raises(RuntimeError, match=r"weight: W8A8Linear needs an int8 tensor here, the state dict has "
                                           r"torch.float32 \(a floating-point model's weights are quantized"):
        target.load_state_dict(state)
    assert torch.equal(target.weight, torch.zeros_like(target.weight))  # nothing half-loaded
    state = q.state_dict()
    state["weight_scale"] = torch.ones(32, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="weight_scale: W8A8Linear needs a floating-point tensor"):
        W8A8Linear(64, 32).load_state_dict(state)
    experts = W8A8Experts.from_experts(_experts())
    e_state = experts.state_dict()
    e_state["down_proj"] = e_state["down_proj"].float()
    with pytest.raises(RuntimeError, match="down_proj: W8A8Experts needs an int8 tensor"):
        W8A8Experts.from_experts(_experts(seed=1)).load_state_dict(e_state)


def test_assigned_half_precision_scales_become_float32():
    q = W8A8Linear.from_linear(nn.Linear(64, 32))
    half = {k: v.half() if v.is_floating_point() else v for k, v in q.state_dict().items()}
    m = W8A8Linear(64, 32, device="meta")
    m.load_state_dict(half, assign=True)
    assert m.weight.dtype == torch.int8 and m.weight_scale.dtype == m.bias.dtype == torch.float32
    x = torch.randn(4, 64, dtype=torch.float16)
    assert m(x).dtype == torch.float16  # before: "w_scale must be torch.float32"
    assert torch.equal(m.weight_scale, q.weight_scale.half().float())


def test_type_half_keeps_the_int8_weights_and_float32_scales():
    model = nn.Sequential(W8A8Linear.from_linear(nn.Linear(64, 32)))
    experts = W8A8Experts.from_experts(_experts())
    for module, int8 in ((model.type(torch.half)[0], ("weight",)), (experts.type(torch.half),
                                                                   ("gate_up_proj", "down_proj"))):
        for name in int8:
            assert getattr(module, name).dtype == torch.int8
        for name in module.FLOAT32_BUFFERS:
            if getattr(module, name) is not None:
                assert getattr(module, name).dtype == torch.float32
    assert model(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# Ctrl-C in the middle of a forward
# ----------------------------------------------------------------------------------------------
def test_an_interrupted_forward_leaves_no_scope_that_shares_later():
    model = make_model("llama")
    sq.quantize_(model, sq.SmoothQuantConfig(progress=False, smooth=False))
    k_proj = model.model.layers[0].self_attn.k_proj

    def interrupt(module, args):
        raise KeyboardInterrupt  # Ctrl-C: nn.Module runs always_call hooks on Exception only

    handle = k_proj.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(calib_tokens(1, 8))
    handle.remove()
    assert _quant._state.scopes  # the attention call's scope was left open
    # linears of another parent, called on their own, do not share in that scope: a write the version
    # counter cannot see is honoured
    gate, up = model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj
    x = torch.randn(4, 64)
    with torch.no_grad():
        gate(x)
        x.data.mul_(3.0)
        got = up(x)
        with shared_activation_quantization(False):
            want = up(x.clone())
    assert torch.equal(got, want)
    with torch.no_grad():  # the next call of the model closes what the interrupted one left open
        model(calib_tokens(1, 8))
    assert not _quant._state.scopes and _quant._state.slot.value is None


# ----------------------------------------------------------------------------------------------
# The layer-by-layer runner
# ----------------------------------------------------------------------------------------------
def test_a_walk_holds_two_sets_of_hidden_states_and_a_second_walk_gives_the_same():
    model = make_model("llama", num_hidden_layers=4)
    layers = decoder_layers(model, family_of(model))
    batches = [calib_tokens(2, 16, seed=s) for s in range(3)]
    alive = []

    def visit(name, layer, inputs, outputs):
        held = list(run.inputs) + [args[0] for args, _ in inputs] + list(outputs)
        alive.append(len({t.untyped_storage().data_ptr() for t in held}))

    with torch.no_grad(), LayerwiseRun(model, layers, batches, "cpu", calibration.run_model) as run:
        first = run.walk(visit)
        assert run.inputs == []  # the first layer's inputs are not kept for the whole walk
        second = run.walk()
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert alive == [2 * len(batches)] * 4  # this layer's inputs and outputs only
    assert run.template is None
