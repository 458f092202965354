"""quantize_'s peak GPU memory: module by module (the default) needs far less than the int8 copy of the
model on top of it; atomic=True needs all of it. Needs a CUDA GPU, not the extension (quantizing a weight
runs torch ops)."""
from __future__ import annotations

import pytest
import torch

import sq_kernels as sq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                                                     "is False)")


def _extra_peak(atomic: bool) -> tuple[int, int]:
    """(peak bytes allocated during quantize_ above the FP model, bytes of the converted int8 weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half().eval()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    report = sq.quantize_(model, sq.SmoothQuantConfig(smooth=False, progress=False), atomic=atomic)
    torch.cuda.synchronize()
    int8 = sum(model.get_submodule(n).weight.numel() for n in report.converted)
    extra = torch.cuda.max_memory_allocated() - before
    del model
    torch.cuda.empty_cache()
    return extra, int8


def test_module_by_module_peak_is_one_module_not_the_model():
    stream, int8 = _extra_peak(atomic=False)
    atomic, _ = _extra_peak(atomic=True)
    largest = 4096 * 1024  # one gate/up/down projection's elements
    # the int8 copy of every linear must be held at once when atomic, never when streaming
    assert atomic >= int8, f"atomic extra peak {atomic} B < int8 weights {int8} B"
    # one module at a time: its int8 weight, one float32 block and a bool mask (~6 bytes per element)
    assert stream < 8 * largest, f"streaming extra peak {stream} B; one module's temporaries are ~{6 * largest} B"
    assert stream < atomic / 4


def test_gpu_model_saved_in_shards_loads_back_bitwise(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import calib_tokens, make_model
    model = make_model("llama").cuda().half()
    sq.quantize_(model, sq.SmoothQuantConfig(smooth=False, progress=False))
    sq.save_quantized(model, tmp_path, max_shard_size=40_000, progress=False)
    assert len(list(tmp_path.glob("sq_model-*-of-*.safetensors"))) > 1
    loaded = sq.load_quantized(tmp_path, device="cuda")
    x = calib_tokens(2, 16, seed=3).cuda()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
