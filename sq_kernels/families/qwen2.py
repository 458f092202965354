"""Qwen2: the Llama-style table (q/k/v carry biases, which smoothing leaves alone: it scales input
channels only); alpha 0.8."""
from . import FamilySpec
from ._llama_like import ATTENTION, MLP, PAIRS

SPEC = FamilySpec(
    name="Qwen2",
    model_types=("qwen2",),
    layers="model.layers",
    groups=(ATTENTION, MLP),
    linear_pairs=PAIRS,
    default_alpha=0.8,
    description="Qwen2 / Qwen2.5 dense models",
)
