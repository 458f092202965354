"""Qwen3 (dense): the Llama-style table. Its q_norm / k_norm act on the q and k projections' outputs (per
head, before rotary), which smoothing, scaling input channels only, leaves alone; alpha 0.8 as for Qwen2
(not tuned on a real checkpoint: no hub access here; alpha="auto" searches per layer)."""
from . import FamilySpec
from ._llama_like import ATTENTION, MLP, PAIRS

SPEC = FamilySpec(
    name="Qwen3",
    model_types=("qwen3",),
    layers="model.layers",
    groups=(ATTENTION, MLP),
    linear_pairs=PAIRS,
    default_alpha=0.8,
    description="Qwen3 dense models (Qwen3-MoE is not covered)",
)
