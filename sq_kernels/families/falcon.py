"""Falcon, in its three layouts (transformers' ``FalconDecoderLayer``):

- new decoder architecture with two norms (40B/180B): ``ln_attn -> query_key_value``,
  ``ln_mlp -> dense_h_to_4h``;
- parallel attention with one norm (7B, or the new architecture with ``num_ln_in_parallel_attn=1``):
  ``input_layernorm -> query_key_value + dense_h_to_4h`` (one shared s);
- sequential (``parallel_attn=False``, falcon-rw): ``input_layernorm -> query_key_value``,
  ``post_attention_layernorm -> dense_h_to_4h``.

Alpha 0.6 (the SmoothQuant README: 0.6 for Falcon-7B, 0.7 for 40B). No linear pairs (GELU)."""
from . import FamilySpec, SmoothGroup


def _two_norms(c) -> bool:
    return bool(c.new_decoder_architecture) and (c.num_ln_in_parallel_attn or 2) == 2


def _one_norm_parallel(c) -> bool:
    if c.new_decoder_architecture:
        return (c.num_ln_in_parallel_attn or 2) == 1
    return bool(c.parallel_attn)


def _sequential(c) -> bool:
    return not c.new_decoder_architecture and not c.parallel_attn


def _refuse(config):
    if config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 1 and not config.parallel_attn:
        return "new_decoder_architecture with one norm but parallel_attn=False is not a layout transformers runs"
    return None


SPEC = FamilySpec(
    name="Falcon",
    model_types=("falcon",),
    layers="transformer.h",
    groups=(
        SmoothGroup("ln_attn", ("self_attention.query_key_value",), when=_two_norms),
        SmoothGroup("ln_mlp", ("mlp.dense_h_to_4h",), when=_two_norms),
        SmoothGroup("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h"),
                    when=_one_norm_parallel),
        SmoothGroup("input_layernorm", ("self_attention.query_key_value",), when=_sequential),
        SmoothGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), when=_sequential),
    ),
    default_alpha=0.6,
    refuse=_refuse,
    description="tiiuae/falcon-* (7B parallel attention, 40B/180B new decoder architecture, rw sequential)",
)
