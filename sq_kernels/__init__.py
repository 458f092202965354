"""sq-kernels: SmoothQuant W8A8 inference on INT8 tensor cores.

Layers (see ARCHITECTURE.md): ``sq_kernels.ops`` (torch ops over CUDA kernels, with PyTorch
references) -> ``sq_kernels.nn`` (W8A8 modules) -> calibration / smoothing / quantize_ API.
"""
from . import ops
from ._extension import built_archs, extension_error, has_cuda_kernels

__version__ = "0.1.0"
__all__ = ["ops", "has_cuda_kernels", "extension_error", "built_archs", "__version__"]
