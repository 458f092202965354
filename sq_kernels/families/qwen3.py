"""Qwen3 (dense): the Qwen2 table (the Llama-style one, alpha 0.8). Its q_norm / k_norm act on the q and k
projections' outputs (per head, before rotary), which smoothing, scaling input channels only, leaves alone.
Alpha is not tuned on a real checkpoint (no hub access here); alpha="auto" searches per layer."""
import dataclasses

from . import qwen2

SPEC = dataclasses.replace(qwen2.SPEC, name="Qwen3", model_types=("qwen3",),
                           description="Qwen3 dense models (Qwen3-MoE is not covered)")
