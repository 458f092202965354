"""The ops' Python wrappers under conditions a user creates without meaning to: compiling a call whose
input requires grad, a size-1 last dimension with an odd stride, empty leading dimensions, int8 operands
carved out of a buffer at an odd offset."""
import warnings

import pytest
import torch

from sq_kernels import ops

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", ["quantize_static", "bmm_qk"])
def test_single_output_ops_compile_on_inputs_that_require_grad(case):
    # an HF model called outside no_grad; Dynamo needs the no-backward wrapper to return a tuple
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64, requires_grad=True)
    s = torch.tensor([0.05])
    q = torch.randint(-128, 128, (2, 5, 64), dtype=torch.int8)
    k = torch.randint(-128, 128, (2, 16, 64), dtype=torch.int8)
    alpha = torch.tensor([0.01], requires_grad=True)
    fn = {"quantize_static": lambda: ops.quantize_per_tensor(x, s)[0], "bmm_qk": lambda: ops.bmm_qk(q, k, alpha)}[case]
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")()
    assert torch.equal(got, fn())


def test_a_size_one_last_dimension_with_another_stride_is_taken():
    x = torch.randn(1, 4).t()  # shape (4, 1), strides (1, 4): .contiguous() would keep them
    assert x.stride() == (1, 4)
    for fn in (ops.quantize_per_token, lambda t: ops.quantize_per_tensor(t, torch.tensor([0.05])), ops.relu_quant):
        got, want = fn(x), fn(x.reshape(4).clone().reshape(4, 1))
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_empty_leading_dimensions_give_empty_results():
    a = torch.zeros(2, 3, 0, 16, dtype=torch.int8)
    b = torch.zeros(2, 3, 16, 16, dtype=torch.int8)
    assert ops.int8_bmm(a, b).shape == (2, 3, 0, 16)
    q = torch.zeros(1, 2, 0, 64)
    kv = torch.randn(1, 2, 16, 64)
    assert ops.int8_attention(q, kv, kv).shape == (1, 2, 0, 64)
    x_q, scale = ops.quantize_per_token(torch.zeros(2, 0, 32))
    assert x_q.shape == (2, 0, 32) and scale.shape == (2, 0)


def test_operands_at_an_odd_offset_are_copied_or_refused_with_advice_that_works():
    torch.manual_seed(0)
    buf = torch.randint(-128, 128, (1 + 2 * 8 * 64,), dtype=torch.int8)
    q = buf[1:].view(1, 2, 8, 64)  # contiguous, one byte into its storage
    k = torch.randint(-128, 128, (1, 2, 16, 64), dtype=torch.int8)
    s = torch.tensor([0.05])
    assert torch.equal(ops.int8_attention(q, k, k, s, s, s), ops.int8_attention(q.clone(), k, k, s, s, s))
    with pytest.raises(ValueError, match=r"q starts 1 bytes into its storage.*\.clone\(\)"):
        ops.bmm_qk(q, k, s)
    assert ops.bmm_qk(q.clone(), k, s).shape == (1, 2, 8, 16)


def test_arguments_that_are_not_tensors_are_value_errors_naming_them():
    x, w = torch.randn(4, 32), torch.ones(32)
    cases = [(lambda: ops.quantize_per_tensor(x, 0.1), "quantize_per_tensor: scale must be a tensor"),
             (lambda: ops.relu_quant(x, 0.1), "relu_quant: scale must be a tensor"),
             (lambda: ops.gelu_quant(x, scale=0.1), "gelu_quant: scale must be a tensor"),
             (lambda: ops.silu_mul_quant(x, [1.0] * 32), "silu_mul_quant: up must be a tensor"),
             (lambda: ops.rms_norm_quant(x, w, scale=0.1), "rms_norm_quant: scale must be a tensor"),
             (lambda: ops.rms_norm_quant(x, None), r"rms_norm_quant: weight must be a tensor, got NoneType"),
             (lambda: ops.layer_norm_quant(x, w, [0.0] * 32), "layer_norm_quant: bias must be a tensor")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
