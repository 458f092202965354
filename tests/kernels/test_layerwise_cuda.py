"""Layer-by-layer calibration on a real second device: a model in CPU memory calibrated with
``device="cuda"`` (one decoder layer on the GPU at a time). Needs a CUDA GPU, not the extension."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import sq_kernels as sq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                                                     "is False)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import MULTIMODAL, NEWER_FAMILIES, FAMILIES, calib_tokens, make_model  # noqa: E402


def _weights(model):
    return {n: (t, t.data_ptr()) for n, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("family", FAMILIES + NEWER_FAMILIES + MULTIMODAL)
def test_cpu_model_calibrated_on_the_gpu(family):
    model = make_model(family)
    data = calib_tokens(6, 24)
    on_cpu = sq.collect_act_stats(model, data, batch_size=2, progress=False)
    before = _weights(model)
    on_gpu = sq.collect_act_stats(model, data, batch_size=2, progress=False, device="cuda")
    assert on_gpu.names() == on_cpu.names()
    for name in on_cpu.names():
        torch.testing.assert_close(on_gpu[name], on_cpu[name], rtol=1e-4, atol=1e-5, msg=name)
        assert on_gpu.tokens[name] == on_cpu.tokens[name]
    after = _weights(model)  # the model is where it was, on the very same tensors
    assert after.keys() == before.keys()
    assert all(after[n][0] is before[n][0] and after[n][1] == before[n][1] and after[n][0].device.type == "cpu"
               for n in before)


def test_gpu_holds_one_layer_at_a_time():
    # eight layers of 2 x 256 x 1024 x 3 weights each: the GPU peak stays far below the model's size
    model = make_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, outliers=False)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    sq.collect_act_stats(model, calib_tokens(4, 32), progress=False, device="cuda")
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < 0.5 * total, (peak, total)


def test_smoothquant_with_a_calibration_device_returns_a_cpu_model():
    model = make_model("mixtral")
    config = sq.SmoothQuantConfig(calibration_device="cuda", alpha="auto", alpha_grid=(0.5, 0.8), progress=False)
    report = sq.smoothquant(model, calib_tokens(), config)
    assert report.converted and all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(calib_tokens(1, 8)).logits).all()
