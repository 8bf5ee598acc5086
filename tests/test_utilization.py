"""MFU and MBU: the per-token counts, the peaks, and their place in a run's files."""

from __future__ import annotations

import json

import pytest
import torch

from peerlab.model import PEER, build_model, peer_bytes_per_token, training_flops_per_token
from peerlab.tracking import read_metrics
from peerlab.train.utilization import card_peaks, compute_precision, measure_peaks
from tests.test_train import run, tiny


def test_peer_bytes_per_token_counts_the_rows_a_token_moves(demo_corpus):
    """Against the built model: each PEER layer's S retrieved rows of both tables, read twice, written once."""
    m = tiny(
        demo_corpus, "model_config.num_hidden_layers=3", "model_config.peer_config.expert_hidden_size=2"
    ).model_config
    model = build_model(m)
    want = 0
    for layer in model.modules():
        if isinstance(layer, PEER):
            rows = layer.num_heads * layer.k * layer.expert_hidden_size  # retrievals of one token in one table
            # forward reads down and up; backward reads both again and writes both gradients
            want += (2 + 2 + 2) * rows * layer.down.shape[1] * layer.down.element_size()
    assert want > 0 and peer_bytes_per_token(m, 4) == want
    dense = tiny(demo_corpus, "model_config.use_peer=false").model_config
    assert peer_bytes_per_token(dense, 4) == 0


def test_card_peaks_pick_the_right_card_and_precision():
    h200 = card_peaks("NVIDIA H200", "bf16")
    assert h200.flops == pytest.approx(989.4e12) and h200.bandwidth == pytest.approx(4.8e12)
    pcie = card_peaks("NVIDIA H100 PCIe", "bf16")  # not the SXM card's figures, though both say "H100"
    assert pcie.flops == pytest.approx(756e12) and pcie.bandwidth == pytest.approx(2.0e12)
    sxm = card_peaks("NVIDIA H100 80GB HBM3", "tf32")
    assert sxm.flops == pytest.approx(989.4e12 / 2) and sxm.bandwidth == pytest.approx(3.35e12)
    assert card_peaks("NVIDIA A100-SXM4-40GB", "float32").flops == pytest.approx(19.5e12)
    assert card_peaks("Some Future GPU", "bf16") is None
    assert compute_precision("bf16", False, False) == "bf16" and compute_precision(None, True, False) == "bf16"
    assert compute_precision(None, False, True) == "tf32" and compute_precision(None, False, False) == "float32"


def test_measured_cpu_peaks_are_plausible():
    peaks = measure_peaks(torch.device("cpu"), "float32")
    assert 1e9 < peaks.flops < 1e14 and 1e8 < peaks.bandwidth < 1e13
    assert peaks.source.startswith("measured on this cpu")


def test_every_run_logs_mfu_and_mbu_against_the_peaks_it_names(demo_corpus, tmp_path):
    cfg = tiny(demo_corpus, "train_config.logging_steps=2", steps=4)
    run(cfg, tmp_path / "u")
    info = json.loads((tmp_path / "u" / "run_info.json").read_text())
    m, seq = cfg.model_config, cfg.dataset_config.max_seq_length
    assert info["flops_per_token"] == training_flops_per_token(m, seq)
    assert info["peer_bytes_per_token"] == peer_bytes_per_token(m, 4)
    peaks = info["peaks"]
    assert peaks["flops"] > 0 and peaks["bandwidth"] > 0 and "measured" in peaks["source"]
    lines = [r for r in read_metrics(tmp_path / "u") if "loss" in r]
    assert [r["step"] for r in lines] == [2, 4]
    for r in lines:
        step_rate = 2 * cfg.train_config.per_device_train_batch_size * seq / r["train_s"]  # 2 steps' tokens
        assert r["mfu"] == pytest.approx(info["flops_per_token"] * step_rate / peaks["flops"], rel=1e-6)
        assert r["mbu"] == pytest.approx(info["peer_bytes_per_token"] * step_rate / peaks["bandwidth"], rel=1e-6)
        assert 0 < r["mfu"] < 1 and 0 < r["mbu"] < 1
