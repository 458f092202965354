"""Phi-3 (``model_type="phi3"``): RMSNorm before a fused ``qkv_proj`` and before a fused ``gate_up_proj``.
No linear pairs: ``down_proj``'s inputs are the ``up`` half of ``gate_up_proj``'s rows times the activated
gate half, and a pair folds into every output row of its source. Alpha 0.8 (not tuned on a real
checkpoint: no hub access here; alpha="auto" searches per layer)."""
from . import FamilySpec, SmoothGroup

SPEC = FamilySpec(
    name="Phi3",
    model_types=("phi3",),
    layers="model.layers",
    groups=(SmoothGroup("input_layernorm", ("self_attn.qkv_proj",)),
            SmoothGroup("post_attention_layernorm", ("mlp.gate_up_proj",))),
    linear_pairs=(),
    default_alpha=0.8,
    description="Phi-3 / Phi-3.5 / Phi-4 dense models (fused qkv and gate_up projections)",
)
