"""Gemma 2: four norms per layer. ``input_layernorm -> q, k, v`` and ``pre_feedforward_layernorm -> gate,
up`` feed linears and are smoothed (``1 + weight`` folded, as Gemma); ``post_attention_layernorm`` and
``post_feedforward_layernorm`` normalise the sublayers' outputs before the residual add and feed no linear,
so they are left alone. Alpha 0.8, not tuned on a real checkpoint: alpha="auto" searches per layer."""
import dataclasses

from . import FamilySpec
from . import _llama_like as llama
from .gemma import ATTENTION, PAIRS

SPEC = FamilySpec(
    name="Gemma2",
    model_types=("gemma2",),
    layers="model.layers",
    groups=(ATTENTION, dataclasses.replace(llama.MLP, source="pre_feedforward_layernorm", weight_offset=1.0)),
    linear_pairs=PAIRS,
    default_alpha=0.8,
    description="Gemma 2 (2B / 9B / 27B)",
)
