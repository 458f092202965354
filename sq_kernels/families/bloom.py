"""BLOOM: ``input_layernorm -> query_key_value``; ``post_attention_layernorm -> dense_h_to_4h``; alpha 0.5
(the paper's). No linear pairs: GELU is not homogeneous, and ``query_key_value`` interleaves q/k/v per
head. Refused: ``apply_residual_connection_post_layernorm`` (the residual is the LayerNorm's output, so
it would change with s); refused for quantization too, smoothed or not: ``pretraining_tp > 1`` with
``slow_but_exact`` (it reads the weights directly instead of calling the linear)."""
from . import FamilySpec, SmoothGroup


def _refuse(config):
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        return ("apply_residual_connection_post_layernorm=True: the residual branch is the LayerNorm's output, "
                "so folding 1/s into the LayerNorm would change the residual stream; quantize without smoothing "
                "(smooth=False)")
    return None


def _refuse_quantize(config):
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        return ("pretraining_tp > 1 with slow_but_exact=True slices the linears' weights directly instead of "
                "calling them, which quantized modules cannot serve; set slow_but_exact=False")
    return None


SPEC = FamilySpec(
    name="BLOOM",
    model_types=("bloom",),
    layers="transformer.h",
    groups=(
        SmoothGroup("input_layernorm", ("self_attention.query_key_value",)),
        SmoothGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
    default_alpha=0.5,
    refuse=_refuse,
    refuse_quantize=_refuse_quantize,
    description="bigscience/bloom* and bloomz*",
)
