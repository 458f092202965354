"""Gemma 3 text models (``model_type="gemma3_text"``, e.g. Gemma-3-1B): the Gemma 2 table (q_norm / k_norm
act on the projections' outputs, which smoothing leaves alone). The multimodal Gemma 3
(``model_type="gemma3"``, with a vision tower) is not covered."""
import dataclasses

from . import gemma2

SPEC = dataclasses.replace(gemma2.SPEC, name="Gemma3", model_types=("gemma3_text",),
                           description="Gemma 3 text-only models (the multimodal gemma3 is not covered)")
