"""Gemma 3 text models (``model_type="gemma3_text"``, e.g. Gemma-3-1B): the Gemma 2 table (q_norm / k_norm
act on the projections' outputs, which smoothing leaves alone). The multimodal Gemma 3 (``model_type="gemma3"``,
4B and up) gets this table on its language model through ``families._language_model_spec``, its vision
tower kept in floating point."""
import dataclasses

from . import gemma2

SPEC = dataclasses.replace(gemma2.SPEC, name="Gemma3", model_types=("gemma3_text",),
                           description="Gemma 3 text models (and the language model of the multimodal gemma3)")
