"""peerlab: ablations of small PEER/MLA language models on Ray."""

__version__ = "0.1.0"
