"""torch.compile on whole quantized models (CPU, reference ops): ``fullgraph=True`` must trace the W8A8
model without a graph break, and the compiled logits must equal the eager ones.

The MoE experts (Mixtral) read the routing on the host, as transformers' eager experts do, so they are
the one documented graph break: ``fullgraph=True`` names it, and the default (graph breaks allowed)
still compiles and matches."""
import copy

import pytest
import torch

import sq_kernels as sq

from conftest import calib_tokens, make_model
from conftest import logits as _logits

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(family, scheme):
    model = make_model(family)
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False, scheme=scheme))
    return model


@pytest.mark.parametrize("family,scheme", [("llama", "W8A8"), ("opt", "O3"), ("bloom", "O2")])
def test_fullgraph_compile_matches_eager(family, scheme):
    torch._dynamo.reset()
    model = _quantized(family, scheme)
    x = calib_tokens(2, 16, seed=3)
    eager = _logits(model, x)
    compiled = _logits(torch.compile(model, fullgraph=True), x)
    # Inductor may fuse the float parts (norms, softmax) in another order: float32 rounding only
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_moe_experts_are_the_one_graph_break():
    torch._dynamo.reset()
    model = _quantized("mixtral", "W8A8")
    x = calib_tokens(2, 16, seed=3)
    eager = _logits(model, x)
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|tolist|item"):
        _logits(torch.compile(copy.deepcopy(model), fullgraph=True), x)
    torch._dynamo.reset()
    torch.testing.assert_close(_logits(torch.compile(model), x), eager, rtol=1e-4, atol=1e-4)


def test_outside_no_grad_the_forward_works_and_a_backward_refuses_eager_and_compiled():
    # HF models are often called outside no_grad (their parameters require grad): the W8A8 forward must
    # work, compiled too, while a backward through the int8 ops fails loudly instead of giving the
    # silently partial gradient autograd would compute without a formula.
    model = _quantized("llama", "W8A8")
    x = calib_tokens(2, 16, seed=3)
    want = _logits(model, x)
    static = _quantized("mixtral", "O3")  # static scales, experts too: the residual alone carries no error
    out = static(x).logits
    with pytest.raises(RuntimeError, match="has no backward"):
        out.sum().backward()
    for run in (model, torch.compile(model)):
        out = run(x).logits
        assert out.requires_grad and torch.allclose(out, want, rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match=r"sq_kernels::\w+ has no backward: the W8A8 ops are for inference"):
            out.sum().backward()
