"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): attention as Qwen2 (q/k/v biases); in a sparse layer
``post_attention_layernorm`` feeds the router ``mlp.gate``, every expert's gate/up (fused ``mlp.experts``),
the shared expert's gate/up and the shared expert's one-output gate ``mlp.shared_expert_gate``: one vector
``s`` for all of them. Dense layers get the Llama MLP group. The router and the shared-expert gate absorb
``s`` but stay in floating point (tiny, and they steer the mixture). Pairs: ``up -> down`` in the dense MLP
and in the shared expert. Alpha 0.8, as Mixtral; not tuned on a real checkpoint: alpha="auto" searches."""
from . import FamilySpec, SmoothGroup
from ._llama_like import ATTENTION, DENSE_MLP, DENSE_PAIR, ROUTER_KEEP_FP, V_O_PAIR, sparse_mlp

SPEC = FamilySpec(
    name="Qwen2-MoE",
    model_types=("qwen2_moe",),
    layers="model.layers",
    groups=(
        ATTENTION,
        SmoothGroup("post_attention_layernorm", ("mlp.gate", "mlp.experts", "mlp.shared_expert.gate_proj",
                                                 "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"),
                    in_layer=sparse_mlp),
        DENSE_MLP,
    ),
    linear_pairs=(
        V_O_PAIR,
        DENSE_PAIR,
        SmoothGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), kind="linear",
                    in_layer=sparse_mlp),
    ),
    default_alpha=0.8,
    keep_fp=(ROUTER_KEEP_FP,
             ("mlp.shared_expert_gate", "shared-expert gate: one output, scales the shared expert's share")),
    experts=("mlp.experts",),
    description="Qwen1.5-MoE / Qwen2-MoE models (transformers v5 fused experts, with a shared expert)",
)
