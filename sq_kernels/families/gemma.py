"""Gemma (1): the Llama-style table, except that Gemma's RMSNorm multiplies by ``1 + weight`` (its weights
are stored as offsets from 1), so the fold divides ``1 + weight`` by ``s`` (``weight_offset=1``). Alpha 0.8;
not tuned on a real checkpoint (no hub access here): alpha="auto" searches per layer."""
import dataclasses

from . import FamilySpec
from . import _llama_like as llama
from ._llama_like import PAIRS

ATTENTION = dataclasses.replace(llama.ATTENTION, weight_offset=1.0)
SPEC = FamilySpec(
    name="Gemma",
    model_types=("gemma",),
    layers="model.layers",
    groups=(ATTENTION, dataclasses.replace(llama.MLP, weight_offset=1.0)),
    linear_pairs=PAIRS,
    default_alpha=0.8,
    description="Gemma 2B / 7B",
)
