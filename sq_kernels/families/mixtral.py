"""Mixtral: attention as Llama; ``post_attention_layernorm -> router gate + every expert's w1/w3``
(the transformers v5 fused layout: ``mlp.gate.weight [E, H]`` and ``mlp.experts.gate_up_proj
[E, 2I, H]``), one vector ``s`` shared by the router and all experts, as in the SmoothQuant reference
code. The router is smoothed (its weights absorb ``s``) but stays in floating point: it is tiny and its
top-k choice is sensitive. Alpha 0.8 (the SmoothQuant README's Mixtral-8x7B value)."""
from . import FamilySpec, SmoothGroup
from ._llama_like import ATTENTION, ROUTER_KEEP_FP, V_O_PAIR

SPEC = FamilySpec(
    name="Mixtral",
    model_types=("mixtral",),
    layers="model.layers",
    groups=(
        ATTENTION,
        SmoothGroup("post_attention_layernorm", ("mlp.gate", "mlp.experts")),
    ),
    linear_pairs=(
        V_O_PAIR,
    ),
    default_alpha=0.8,
    keep_fp=(ROUTER_KEEP_FP,),
    experts=("mlp.experts",),
    description="Mixtral 8x7B-style sparse MoE (transformers v5 fused experts)",
)
