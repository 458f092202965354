"""Typed Python wrappers over the ``sq_kernels::*`` torch ops.

Each op has a pure-PyTorch reference registered for every device (the CPU backend and the tests'
oracle); when the CUDA extension is built, its kernels take over for CUDA tensors.
"""
from .gemm import int8_mm, scaled_mm
from .quant import quantize_per_tensor, quantize_per_token
from .norm import layer_norm_quant, rms_norm_quant
from .activation import gelu_quant, relu_quant, silu_mul_quant
from .attention import bmm_pv, bmm_qk, int8_attention, int8_bmm
from .. import _extension

_extension.extension()  # registers the CUDA kernels over the references, when built

__all__ = ["scaled_mm", "int8_mm", "quantize_per_token", "quantize_per_tensor",
           "rms_norm_quant", "layer_norm_quant", "relu_quant", "gelu_quant", "silu_mul_quant",
           "int8_bmm", "bmm_qk", "bmm_pv", "int8_attention"]
