"""The PEER/MLA language model: `build_model(model_config)`."""

from peerlab.model.mla import MLA, LayerCache
from peerlab.model.peer import PEER, peer_experts
from peerlab.model.size import (
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
    "LayerCache",
    "PeerMLAModel",
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
