"""Llama 1/2/3 (``model_type="llama"``): the Llama-style table; alpha 0.85 (the SmoothQuant README's value
for Llama-2 and Llama-3)."""
from . import FamilySpec
from ._llama_like import ATTENTION, MLP, PAIRS

SPEC = FamilySpec(
    name="Llama",
    model_types=("llama",),
    layers="model.layers",
    groups=(ATTENTION, MLP),
    linear_pairs=PAIRS,
    default_alpha=0.85,
    description="Llama 1, 2 and 3 (and Llama-architecture models)",
)
