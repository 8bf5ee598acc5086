"""The PEER/MLA language model (and its MoE, PKM and dense arms): `build_model(model_config)`."""

from peerlab.model.mla import MLA, LayerCache
from peerlab.model.moe import MoE
from peerlab.model.peer import PEER, ProductKeys, peer_experts
from peerlab.model.pkm import PKM
from peerlab.model.size import (
    arm_layer_count,
    count_parameters,
    forward_flops_per_token,
    memory_estimate,
    parameter_formulas,
    peer_bytes_per_token,
    peer_layer_count,
    training_flops_per_token,
)
from peerlab.model.transformer import PeerMLAModel, build_model

__all__ = [
    "MLA",
    "PEER",
    "PKM",
    "LayerCache",
    "MoE",
    "PeerMLAModel",
    "ProductKeys",
    "arm_layer_count",
    "build_model",
    "count_parameters",
    "forward_flops_per_token",
    "memory_estimate",
    "parameter_formulas",
    "peer_bytes_per_token",
    "peer_experts",
    "peer_layer_count",
    "training_flops_per_token",
]
