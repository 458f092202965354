"""Mistral: the Llama-style table; alpha 0.8 (the SmoothQuant README's value for Mistral-7B)."""
from . import FamilySpec
from ._llama_like import ATTENTION, MLP, PAIRS

SPEC = FamilySpec(
    name="Mistral",
    model_types=("mistral",),
    layers="model.layers",
    groups=(ATTENTION, MLP),
    linear_pairs=PAIRS,
    default_alpha=0.8,
    description="Mistral 7B-style models",
)
