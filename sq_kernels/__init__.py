"""sq-kernels: SmoothQuant W8A8 inference on INT8 tensor cores.

Layers (see ARCHITECTURE.md): ``sq_kernels.ops`` (torch ops over CUDA kernels, with PyTorch
references) -> ``sq_kernels.nn`` (W8A8 modules) -> calibration / smoothing / quantize_ API.
"""
from . import ops
from ._extension import built_archs, extension_error, has_cuda_kernels

__version__ = "0.1.0"
__all__ = ["ops", "has_cuda_kernels", "extension_error", "built_archs", "__version__"]

# The SmoothQuant layer (calibration -> smoothing -> W8A8 modules -> checkpoints); transformers is
# imported only when a model family, a checkpoint or the CLI needs it.
from .config import Scheme, SmoothQuantConfig
from .nn import W8A8Experts, W8A8Linear
from .calibration import ActStats, collect_act_stats
from .smooth import SmoothReport, smooth_
from .api import ConversionReport, PartialConversionError, quantize_, smoothquant
from .checkpoint import CheckpointError, load_quantized, save_quantized

__all__ += ["SmoothQuantConfig", "Scheme", "W8A8Linear", "W8A8Experts", "ActStats", "collect_act_stats",
            "SmoothReport", "smooth_", "ConversionReport", "PartialConversionError", "quantize_",
            "smoothquant", "save_quantized", "load_quantized", "CheckpointError"]
