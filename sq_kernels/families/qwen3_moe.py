"""Qwen3-MoE (e.g. Qwen3-30B-A3B): attention as Llama (q_norm / k_norm act on the projections' outputs,
which smoothing leaves alone); ``post_attention_layernorm -> router mlp.gate + every expert's gate/up``
(transformers v5 fused ``mlp.experts``), one vector ``s`` shared by the router and the experts, as for
Mixtral. Layers listed in ``mlp_only_layers`` (or skipped by ``decoder_sparse_step``) are dense and get
the Llama MLP group instead. The router is smoothed but stays in floating point. Alpha 0.8, as Mixtral;
not tuned on a real checkpoint (no hub access here): alpha="auto" searches per layer."""
from . import FamilySpec, SmoothGroup
from ._llama_like import ATTENTION, DENSE_MLP, DENSE_PAIR, ROUTER_KEEP_FP, V_O_PAIR, sparse_mlp

SPEC = FamilySpec(
    name="Qwen3-MoE",
    model_types=("qwen3_moe",),
    layers="model.layers",
    groups=(
        ATTENTION,
        SmoothGroup("post_attention_layernorm", ("mlp.gate", "mlp.experts"), in_layer=sparse_mlp),
        DENSE_MLP,
    ),
    linear_pairs=(
        V_O_PAIR,
        DENSE_PAIR,
    ),
    default_alpha=0.8,
    keep_fp=(ROUTER_KEEP_FP,),
    experts=("mlp.experts",),
    description="Qwen3 mixture-of-experts models (transformers v5 fused experts)",
)
