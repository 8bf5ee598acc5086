"""Shared helpers for the tests: small configs built through the same typed tree as YAML."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach the network: the hub code paths run on local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from peerlab.config import MLAConfig, ModelConfig, PeerConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_config(**overrides) -> ModelConfig:
    """A model small enough for float64 checks in milliseconds."""
    peer = PeerConfig(
        num_experts=64,
        product_key_dim=[8, 8],
        num_experts_per_tok=4,
        num_heads=2,
        query_dim=8,
        expert_hidden_size=overrides.pop("expert_hidden_size", 1),
        batch_norm_query=overrides.pop("batch_norm_query", True),
    )
    mla = MLAConfig(
        q_lora_rank=overrides.pop("q_lora_rank", 24),
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        qk_nope_head_dim=10,
        rope_theta=overrides.pop("rope_theta", 10000.0),
    )
    base = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=64,
        initializer_range=0.05,
        layer_norm_eps=1e-6,
        use_peer=True,
        peer_start_layer=1,
        peer_config=peer,
        mla_config=mla,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session, bound to loopback (FACTS.md: never two)."""
    import ray

    start_session_cluster()
    yield ray


def start_session_cluster() -> None:
    """The session's cluster (ray_cluster); tests/test_cluster.py stops it while its own cluster runs."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            object_store_memory=500_000_000,
            log_to_driver=False,
            configure_logging=False,
        )


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """The embedded default corpus and tokenizer, prepared once into a temporary folder."""
    from peerlab.data.corpus import prepare_demo_corpus

    return prepare_demo_corpus(tmp_path_factory.mktemp("demo"), quiet=True)


def run_in_triton_interpreter(cases: Path) -> None:
    """Run a test file of Triton cases in a pytest subprocess with TRITON_INTERPRET=1 (it must be set before
    triton is first imported, so not in this session); fail unless every case ran and passed."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)]
    run = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
