"""OPT: pre-LN decoder; ``self_attn_layer_norm -> q, k, v`` and ``final_layer_norm -> fc1`` (alpha 0.5,
the paper's). ``fc1 -> fc2`` folds through ReLU (positively homogeneous); ``v -> out_proj`` is exact
(multi-head attention, no grouping). OPT-350m-style post-LN (``do_layer_norm_before=False``) is refused."""
from . import FamilySpec, SmoothGroup


def _refuse(config):
    if not getattr(config, "do_layer_norm_before", True):
        return ("this OPT variant is post-LN (do_layer_norm_before=False, like OPT-350m): its LayerNorm runs "
                "after the residual add, so dividing the LayerNorm output by s would also change the residual "
                "stream. SmoothQuant cannot fold its scales there; quantize without smoothing (smooth=False)")
    if not getattr(config, "layer_norm_elementwise_affine", True):
        return "the LayerNorms have no affine weight (layer_norm_elementwise_affine=False) to fold s into"
    return None


SPEC = FamilySpec(
    name="OPT",
    model_types=("opt",),
    layers="model.decoder.layers",
    groups=(
        SmoothGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothGroup("final_layer_norm", ("fc1",)),
    ),
    linear_pairs=(
        SmoothGroup("self_attn.v_proj", ("self_attn.out_proj",), kind="linear"),
        SmoothGroup("fc1", ("fc2",), kind="linear", when=lambda c: getattr(c, "activation_function", "relu") == "relu",
                    note="needs ReLU between them"),
    ),
    default_alpha=0.5,
    refuse=_refuse,
    description="facebook/opt-* (pre-LN: 125m and >= 1.3b)",
)
