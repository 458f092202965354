"""The Llama-style decoder table shared by Llama, Mistral and Qwen2: RMSNorm before attention
(``input_layernorm -> q, k, v``) and before the gated MLP (``post_attention_layernorm -> gate, up``).
Pairs: ``up -> down`` (the gate multiplies ``up`` elementwise, so ``down``'s input scales with ``up``'s
output rows), ``v -> o`` only without grouped-query attention (each o input channel then has its own v row)."""
from . import SmoothGroup


def no_gqa(config) -> bool:
    kv = getattr(config, "num_key_value_heads", None)
    return kv is None or kv == config.num_attention_heads


ATTENTION = SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
MLP = SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
PAIRS = (
    SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear", when=no_gqa,
                note="skipped with grouped-query attention"),
    SmoothGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
)
