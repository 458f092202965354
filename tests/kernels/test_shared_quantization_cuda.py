"""Shared activation quantization on the GPU: q/k/v and gate/up reuse one quantization in eager runs and in a
captured CUDA graph, bitwise as if each linear quantized its input; another stream quantizes again."""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

import sq_kernels
import sq_kernels as sq
from sq_kernels.nn import shared_activation_quantization, sharing_scope

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sq_kernels.has_cuda_kernels()),
    reason="needs a CUDA GPU and the built sq_kernels._C extension: " + str(sq_kernels.extension_error()))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import calib_tokens, make_model  # noqa: E402


def _quantized(dtype=torch.float16):
    model = make_model("llama")
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False))
    return model.to(device="cuda", dtype=dtype)


def _quantize_calls(fn):
    with torch.profiler.profile() as prof:
        fn()
        torch.cuda.synchronize()
    return sum(n for name, n in collections.Counter(e.name for e in prof.events()).items()
               if name.startswith("sq_kernels::quantize"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eager_and_graph_runs_share_and_match(dtype):
    model = _quantized(dtype)
    x = calib_tokens(2, 16, seed=3).cuda()
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        assert _quantize_calls(lambda: model(x)) == 4 * layers
        shared = model(x).logits
        with shared_activation_quantization(False):
            assert _quantize_calls(lambda: model(x)) == 7 * layers
            alone = model(x).logits
        assert torch.equal(shared, alone)
        static_x = x.clone()
        for _ in range(2):  # warm-up on a side stream, as CUDA graph capture wants
            model(static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static_x).logits
        static_x.copy_(calib_tokens(2, 16, seed=4).cuda())
        graph.replay()
        torch.cuda.synchronize()
        with shared_activation_quantization(False):
            want = model(static_x).logits
        assert torch.equal(out, want)


def test_another_stream_quantizes_again():
    lin = [sq.W8A8Linear.from_linear(torch.nn.Linear(64, 32)).cuda() for _ in range(2)]
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    with torch.no_grad(), sharing_scope():
        def run():
            lin[0](x)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                lin[1](x)
            torch.cuda.current_stream().wait_stream(side)
        assert _quantize_calls(run) == 2
        assert _quantize_calls(lambda: (lin[0](x), lin[1](x))) == 1


def test_two_captures_of_one_input_do_not_share():
    # each capture is its own forward, so its own scopes: the second graph quantizes for itself
    model = _quantized()
    x = calib_tokens(2, 16, seed=3).cuda()
    graphs, outs = [], []
    with torch.no_grad():
        for _ in range(2):
            model(x)
        for _ in range(2):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs.append(model(x).logits)
            graphs.append(g)
        x.copy_(calib_tokens(2, 16, seed=5).cuda())
        for g in graphs:
            g.replay()
        torch.cuda.synchronize()
        want = model(x).logits
    assert torch.equal(outs[0], want) and torch.equal(outs[1], want)
