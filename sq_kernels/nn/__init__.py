"""W8A8 modules: ``W8A8Linear`` (drop-in for ``nn.Linear``) and ``W8A8Experts`` (fused MoE experts)."""
from ._quant import install_sharing_scopes, shared_activation_quantization, sharing_scope
from .experts import W8A8Experts, fused_experts_problem
from .linear import W8A8Linear, check_linear_shape

__all__ = ["W8A8Linear", "W8A8Experts", "fused_experts_problem", "check_linear_shape",
           "shared_activation_quantization", "install_sharing_scopes",
           "sharing_scope"]
