"""The Llama-style decoder table shared by Llama, Mistral and Qwen2: RMSNorm before attention
(``input_layernorm -> q, k, v``) and before the gated MLP (``post_attention_layernorm -> gate, up``).
Pairs: ``up -> down`` (the gate multiplies ``up`` elementwise, so ``down``'s input scales with ``up``'s
output rows), ``v -> o`` only without grouped-query attention (each o input channel then has its own v row)."""
import dataclasses

from . import SmoothGroup


def no_gqa(config) -> bool:
    kv = getattr(config, "num_key_value_heads", None)
    return kv is None or kv == config.num_attention_heads


ATTENTION = SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
MLP = SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
V_O_PAIR = SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear", when=no_gqa,
                      note="skipped with grouped-query attention")
UP_DOWN_PAIR = SmoothGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear")
PAIRS = (V_O_PAIR, UP_DOWN_PAIR)


def sparse_mlp(layer) -> bool:
    """The layer's MLP is a mixture of experts (MoE models may keep some layers dense)."""
    return hasattr(layer.mlp, "experts")


def dense_mlp(layer) -> bool:
    return not sparse_mlp(layer)


# MoE models whose layers are either the Llama-style gated MLP or a sparse block (router ``mlp.gate`` and
# fused ``mlp.experts``): each layer gets the groups of the MLP it has.
DENSE_MLP = dataclasses.replace(MLP, in_layer=dense_mlp)
DENSE_PAIR = dataclasses.replace(UP_DOWN_PAIR, in_layer=dense_mlp)
ROUTER_KEEP_FP = ("mlp.gate", "MoE router: tiny, and its top-k routing is sensitive to error")
