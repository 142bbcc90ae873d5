"""The DiT of MDLM and ProSeCo, the first model family: what the framework needs of it."""

from pretrain.models import ModelFamily
from pretrain.models.dit.checkpoint_names import (
    MODELING_FILE,
    PREFIX,
    VOCAB_PARAMETERS,
    from_official,
    model_fields,
    official_buffers,
    official_config,
    to_official,
    upgrade_state,
    weight_sources,
)
from pretrain.models.dit.model import DiT, forward_flops_per_sequence
from pretrain.models.dit.parallelize import build_stage, parallelize

FAMILY = ModelFamily(name="dit", build=DiT, parallelize=parallelize, build_stage=build_stage,
                     forward_flops=forward_flops_per_sequence,
                     to_official=to_official, from_official=from_official, upgrade_state=upgrade_state,
                     official_config=official_config,
                     model_fields=model_fields, official_buffers=official_buffers,
                     hf_prefix=PREFIX, vocab_parameters=VOCAB_PARAMETERS, hf_modeling_file=MODELING_FILE,
                     weight_sources=weight_sources)
