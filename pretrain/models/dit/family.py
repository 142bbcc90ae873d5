"""The DiT of MDLM and ProSeCo, the first model family: what the framework needs of it."""

from pretrain.models import ModelFamily
from pretrain.models.dit.checkpoint_names import from_official, to_official
from pretrain.models.dit.model import DiT, forward_flops_per_sequence
from pretrain.models.dit.parallelize import build_stage, parallelize

FAMILY = ModelFamily(name="dit", build=DiT, parallelize=parallelize, build_stage=build_stage,
                     forward_flops=forward_flops_per_sequence,
                     to_official=to_official, from_official=from_official)
