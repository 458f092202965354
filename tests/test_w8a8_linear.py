"""W8A8Linear and W8A8Experts on the CPU reference ops: accuracy against the float layer, the exact
order of operations, buffers and dtypes, no host synchronisation, and clear errors."""
import pytest
import torch
from torch import nn

import sq_kernels as sq
from sq_kernels import ops
from sq_kernels.nn import W8A8Experts, W8A8Linear
from sq_kernels.nn.experts import experts_forward_float

from conftest import sqnr

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = [(w, a) for w in ("per_channel", "per_tensor") for a in ("per_token", "per_tensor", "static")]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _linear(k=64, n=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("weight,activation", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float_linear(weight, activation, dtype):
    lin = _linear()
    x = torch.randn(3, 7, 64)
    q = W8A8Linear.from_linear(lin, weight, activation, input_amax=x.abs().max() if activation == "static" else None)
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (3, 7, 48)
    ref = lin(x)
    # int8 weights and activations: ~0.5-1 % relative error for Gaussian data (>= 35 dB); bf16 output adds ~0.4 %
    assert sqnr(ref, y.float()) > 33.0, (weight, activation, dtype, sqnr(ref, y.float()))


def test_float32_path_mirrors_scaled_mm():
    """The float32 path (int8_mm + epilogue in torch) rounds like the fused scaled_mm: cast to fp16 they agree."""
    lin = _linear()
    q = W8A8Linear.from_linear(lin)
    x = torch.randn(5, 64)
    y32 = q(x)
    x_q, x_scale = ops.quantize_per_token(x)
    fused = ops.scaled_mm(x_q, q.weight, x_scale, q.weight_scale, q.bias, out_dtype=torch.float16)
    assert torch.equal(y32.to(torch.float16), fused)
    manual = x_scale[:, None] * (q.weight_scale * (x_q.double() @ q.weight.double().t()).float()) + q.bias
    assert torch.equal(y32, manual)


def test_weight_quantization_is_symmetric_int8():
    lin = _linear()
    with torch.no_grad():
        lin.weight[3] = 0.0  # an all-zero output row must get a finite scale and zero weights
    for granularity, n_scales in (("per_channel", 48), ("per_tensor", 1)):
        q = W8A8Linear.from_linear(lin, weight=granularity)
        assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 64)
        assert q.weight_scale.shape == (n_scales,) and q.weight_scale.dtype == torch.float32
        assert torch.isfinite(q.weight_scale).all() and (q.weight_scale > 0).all()
        assert int(q.weight.abs().max()) == 127 and int(q.weight.min()) >= -127
        err = (q.dequantized_weight() - lin.weight).abs().max()
        assert err <= q.weight_scale.max() / 2 + 1e-7  # at most half a quantization step
    assert not W8A8Linear.from_linear(lin).weight[3].any()
    assert torch.equal(lin.weight[3], torch.zeros(64))  # the source linear is not modified


def test_buffers_not_parameters_and_dtype_casts_keep_float32_scales():
    q = W8A8Linear.from_linear(_linear(), activation="static", input_amax=3.0)
    assert list(q.parameters()) == []
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias", "input_scale"}
    scales_before = q.weight_scale.clone()
    q.half()
    for name in ("weight_scale", "bias", "input_scale"):
        assert getattr(q, name).dtype == torch.float32, name
    assert q.weight.dtype == torch.int8
    assert torch.equal(q.weight_scale, scales_before)  # no round trip through fp16
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.float32
    assert torch.equal(q.input_scale, torch.tensor([3.0 / 127]))


def test_output_shapes_and_empty_input():
    q = W8A8Linear.from_linear(_linear())
    assert q(torch.randn(64)).shape == (48,)
    assert q(torch.randn(2, 3, 4, 64)).shape == (2, 3, 4, 48)
    assert q(torch.randn(0, 64)).shape == (0, 48)
    assert q(torch.randn(64, 3).t()).shape == (3, 48)  # a transposed (non-contiguous) input


def test_zero_rows_give_bias_only():
    lin = _linear()
    q = W8A8Linear.from_linear(lin)
    y = q(torch.zeros(4, 64))
    assert torch.isfinite(y).all()
    assert torch.equal(y, lin.bias.detach().expand(4, -1))


def test_no_bias():
    lin = _linear(bias=False)
    q = W8A8Linear.from_linear(lin)
    assert q.bias is None and "bias=False" in repr(q)
    x = torch.randn(4, 64)
    assert sqnr(lin(x), q(x)) > 33.0


def test_forward_reads_nothing_back_to_the_host():
    """On the meta device every data-dependent host read (.item(), nonzero, bool(tensor)) raises; the
    forward must still run: it only launches ops."""
    for activation in ("per_token", "per_tensor", "static"):
        q = W8A8Linear.from_linear(_linear(), activation=activation,
                                   input_amax=2.0 if activation == "static" else None).to("meta")
        for dtype in DTYPES:
            y = q(torch.empty(2, 5, 64, device="meta", dtype=dtype))
            assert y.shape == (2, 5, 48) and y.dtype == dtype


def test_extra_repr_shows_scheme():
    text = repr(W8A8Linear.from_linear(_linear(), "per_tensor", "static", input_amax=1.0))
    assert "in_features=64" in text and "out_features=48" in text and "per-tensor" in text and "static" in text
    assert "dynamic per-token" in repr(W8A8Linear.from_linear(_linear()))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="in_features=60"):
        W8A8Linear.from_linear(nn.Linear(60, 48))
    with pytest.raises(ValueError, match="out_features=50"):
        W8A8Linear.from_linear(nn.Linear(64, 50))
    with pytest.raises(ValueError, match="input_amax"):
        W8A8Linear.from_linear(_linear(), activation="static")
    with pytest.raises(ValueError, match="weight must be one of"):
        W8A8Linear(64, 48, weight="per_row")
    with pytest.raises(ValueError, match="activation must be one of"):
        W8A8Linear(64, 48, activation="dynamic")
    with pytest.raises(ValueError, match="nn.Linear"):
        W8A8Linear.from_linear(nn.Conv1d(64, 48, 1))
    bad = _linear()
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        W8A8Linear.from_linear(bad, name="layer.q_proj")
    with pytest.raises(ValueError, match="not finite"):
        W8A8Linear.from_linear(_linear(), activation="static", input_amax=float("inf"))
    q = W8A8Linear.from_linear(_linear())
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 64\]"):
        q(torch.randn(3, 32))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        q(torch.ones(3, 64, dtype=torch.int32))


def test_int8_linear_rejects_wrong_scale_dtype_from_ops():
    q = W8A8Linear.from_linear(_linear())
    q.weight_scale = q.weight_scale.double()  # only reachable by tampering; the op still names the argument
    with pytest.raises(ValueError, match="w_scale"):
        q(torch.randn(2, 64, dtype=torch.float16))


# ------------------------------------------------------------------------------------------ experts


def _experts(num_experts=4, hidden=64, inter=32, seed=0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                        num_experts_per_tok=2)
    experts = MixtralExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    return experts


def _routing(tokens=24, num_experts=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g)
    weights, index = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("weight,activation", SCHEMES)
def test_experts_match_transformers(weight, activation):
    experts = _experts()
    x = torch.randn(24, 64)
    index, weights = _routing()
    ref = experts(x, index, weights)
    down_amax = torch.zeros(4)

    def observe(e, h):  # each expert's down_proj input, as calibration sees it
        down_amax[e] = torch.maximum(down_amax[e], h.abs().max())
    assert torch.equal(experts_forward_float(experts, x, index, weights, observe), ref)
    static = activation == "static"
    q = W8A8Experts.from_experts(experts, weight, activation, input_amax=x.abs().max() if static else None,
                                 down_input_amax=down_amax if static else None)
    y = q(x, index, weights)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert sqnr(ref, y) > 25.0
    assert "num_experts=4" in repr(q)


def test_experts_half_precision_and_float32_buffers():
    experts = _experts()
    q = W8A8Experts.from_experts(experts).half()
    assert q.gate_up_proj_scale.dtype == torch.float32 and q.gate_up_proj.dtype == torch.int8
    x = torch.randn(24, 64)
    index, weights = _routing()
    y = q(x.half(), index, weights.half())
    assert y.dtype == torch.float16
    assert sqnr(experts(x, index, weights), y.float()) > 25.0


def test_experts_errors():
    experts = _experts(inter=40)
    with pytest.raises(ValueError, match="intermediate=40 not a multiple of 16"):
        W8A8Experts.from_experts(experts)
    with pytest.raises(ValueError, match="input_amax and down_input_amax"):
        W8A8Experts.from_experts(_experts(), activation="static")
    with pytest.raises(ValueError, match="pass them only with activation='static'"):
        W8A8Experts.from_experts(_experts(), activation="per_token", input_amax=1.0, down_input_amax=torch.ones(4))
    with pytest.raises(ValueError, match="fused experts"):
        W8A8Experts.from_experts(nn.Linear(64, 64))


def test_top_level_exports():
    assert sq.W8A8Linear is W8A8Linear and sq.W8A8Experts is W8A8Experts


def test_every_op_refuses_a_backward_pass():
    import warnings
    x = torch.randn(4, 64, requires_grad=True)
    calls = {
        "w8a8 linear fp32": lambda: W8A8Linear.from_linear(nn.Linear(64, 32))(x),
        # static scales: neither the int8 input nor the buffers carry a gradient, the output is tied to x
        "w8a8 linear static": lambda: W8A8Linear.from_linear(nn.Linear(64, 32), "per_tensor", "static",
                                                             input_amax=4.0)(x),
        "w8a8 linear static fp16": lambda: W8A8Linear.from_linear(nn.Linear(64, 32), "per_tensor", "static",
                                                                  input_amax=4.0)(x.half()),
        "w8a8 linear fp16": lambda: W8A8Linear.from_linear(nn.Linear(64, 32))(x.half()),
        "quantize_per_token": lambda: ops.quantize_per_token(x)[1],
        "rms_norm_quant": lambda: ops.rms_norm_quant(x, torch.ones(64))[1],
    }
    for what, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "autograd kernel was not registered" warning either
            out = call()
        assert out.requires_grad, what
        with pytest.raises(RuntimeError, match="has no backward"):
            out.float().sum().backward()
