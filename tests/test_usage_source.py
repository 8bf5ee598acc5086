"""Expert usage by data source (peerlab.train.usage: track_sources, set_sources, summarise_sources, collect_by_source)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from peerlab.train import usage
from tests.test_peer import make_peer
from tests.test_train import in_two_processes


def tracked(n1=8, n2=8, k=4, heads=2, hidden=1, sources=3, seed=0) -> tuple[nn.Module, object]:
    """A float32 PEER layer that tracks usage, inside a module (as in a model), with an (S, N) table by source."""
    layer = make_peer(n1, n2, k, heads, hidden=hidden, seed=seed).float().train()
    layer.track_usage = True
    layer.usage = torch.zeros(layer.num_experts)
    model = nn.Sequential(layer)
    usage.track_sources(model, sources)
    return model, layer


def slow_by_source(layer, x: torch.Tensor, sources: list[int], num_sources: int) -> torch.Tensor:
    """The (S, N) mass table in float64 by a loop over tokens, heads and retrievals."""
    B, T, d = x.shape
    with torch.no_grad():
        scores, indices = layer.retrieve(x.reshape(-1, d))  # (M, H, k): the batch statistics of the forward
    gate = torch.softmax(scores.double(), -1)
    want = torch.zeros(num_sources, layer.num_experts, dtype=torch.float64)
    for t in range(B * T):
        for h in range(indices.shape[1]):
            for j in range(indices.shape[2]):
                want[sources[t // T], indices[t, h, j]] += gate[t, h, j]
    return want


def test_source_rows_sum_to_the_layers_usage():
    """A real training forward over sequences of three sources: row s holds exactly source s's router mass,
    the rows sum to the layer's (N,) usage, and the layer's summary equals that of the summed table."""
    for hidden in (1, 2):
        model, layer = tracked(hidden=hidden)
        x = torch.randn(4, 5, 16)  # 4 sequences of 5 tokens
        sources = [2, 0, 2, 1]
        usage.set_sources([layer], sources)
        with torch.no_grad():
            want = slow_by_source(layer, x, sources, 3)
            layer(x)
        torch.testing.assert_close(layer.usage_by_source.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.usage_by_source.sum(0), layer.usage, rtol=1e-6, atol=1e-6)
        assert abs(layer.usage_by_source[1].sum().item() - 5 * 2) < 1e-4  # one sequence: 5 tokens x 2 heads
        layer.eval()
        before = layer.usage_by_source.clone()
        layer(x)
        assert torch.equal(layer.usage_by_source, before)  # evaluation does not count
        layer.train()
        whole = usage.summarise(layer.usage.clone(), 2.0)
        summed = usage.summarise(layer.usage_by_source.sum(0), 2.0)
        assert whole["usage"] == summed["usage"] and abs(whole["kl_uniform"] - summed["kl_uniform"]) < 1e-6
        rows = usage.collect_by_source(model, 7, ["a", "b", "c"], distributed=False)
        layer_row = usage.collect(model, 7, 2.0, distributed=False)[0]
        src = [r for r in rows if r["kind"] == "source"]
        assert [r["source"] for r in src] == ["a", "b", "c"] and all(r["step"] == 7 for r in rows)
        assert abs(sum(r["mass_share"] for r in src) - 1) < 1e-12
        assert abs(src[1]["mass_share"] - 0.25) < 1e-6 and abs(src[2]["mass_share"] - 0.5) < 1e-6  # token shares
        # an expert is used by the layer exactly when some source used it
        assert max(r["usage"] for r in src) <= layer_row["usage"] <= sum(r["usage"] for r in src)
        assert layer.usage_by_source.abs().sum() == 0  # the table restarts


def test_one_source_table_is_the_layers_usage_bit_for_bit():
    _, layer = tracked(sources=1)
    usage.set_sources([layer], [0, 0, 0])
    with torch.no_grad():
        layer(torch.randn(3, 4, 16))
    assert torch.equal(layer.usage_by_source[0], layer.usage)


def test_no_source_ids_means_no_table_and_a_wrong_count_is_refused():
    _, layer = tracked()
    with torch.no_grad():
        layer(torch.randn(2, 3, 16))  # no set_sources: only the (N,) sums
        assert layer.usage.sum() > 0 and layer.usage_by_source.sum() == 0
        usage.set_sources([layer], [0, 1, 2, 0])
        try:
            layer(torch.randn(3, 3, 16))  # 9 tokens, 4 sequences
        except ValueError as err:
            assert "4 source ids for 9 tokens" in str(err)
        else:
            raise AssertionError("a batch with the wrong number of source ids was counted")


def reference(mass: list[list[float]]) -> dict:
    """Every statistic of `summarise_sources` in float64 by plain loops over the cells of an (S, N) table."""
    S, N = len(mass), len(mass[0])
    total = sum(sum(row) for row in mass)
    ps = [sum(row) / total for row in mass]
    pe = [sum(mass[s][e] for s in range(S)) / total for e in range(N)]
    mi = 0.0
    for s in range(S):
        for e in range(N):
            p = mass[s][e] / total
            if p > 0:
                mi += p * math.log(p / (ps[s] * pe[e]))
    h = -sum(p * math.log(p) for p in ps if p > 0)
    z = [[v / sum(row) if sum(row) > 0 else 0.0 for v in row] for row in mass]
    kl = [math.log(N) + sum(v * math.log(v) for v in zs if v > 0) for zs in z]
    used = [{e for e in range(N) if mass[s][e] > 0} for s in range(S)]
    pairs = {}
    for a in range(S):
        for b in range(a + 1, S):
            overlap = sum(min(z[a][e], z[b][e]) for e in range(N))
            pairs[(a, b)] = (overlap, len(used[a] & used[b]) / len(used[a] | used[b]))
    exclusive = [len(used[s] - set().union(*(used[o] for o in range(S) if o != s))) / N for s in range(S)]
    return {"mi": mi, "nmi": mi / h, "kl": kl, "pairs": pairs, "exclusive": exclusive, "share": ps, "used": used}


def counted_table(S: int, N: int, draws: int, seed: int) -> list[list[float]]:
    """An (S, N) joint table built one observation at a time, each source preferring its own end of the experts."""
    import random

    rng = random.Random(seed)
    mass = [[0.0] * N for _ in range(S)]
    for _ in range(draws):
        s = rng.randrange(S)
        e = min(N - 1, int(abs(rng.gauss(s * N / S, N / 6))))
        mass[s][e] += rng.random()
    return mass


def test_statistics_against_float64_loops():
    for seed, (S, N, draws) in enumerate([(3, 64, 400), (2, 100, 50), (4, 256, 3000)]):
        mass = counted_table(S, N, draws, seed)
        want = reference(mass)
        names = [f"d{s}" for s in range(S)]
        rows = usage.summarise_sources(torch.tensor(mass, dtype=torch.float32), names)
        src = [r for r in rows if r["kind"] == "source"]
        pair = {(names.index(r["source"]), names.index(r["other"])): r for r in rows if r["kind"] == "pair"}
        assert len(src) == S and len(pair) == S * (S - 1) // 2
        for s, r in enumerate(src):
            assert abs(r["mi"] - want["mi"]) < 1e-5 and abs(r["nmi"] - want["nmi"]) < 1e-5
            assert abs(r["kl_uniform"] - want["kl"][s]) < 1e-5
            assert abs(r["mass_share"] - want["share"][s]) < 1e-6
            assert r["usage"] == len(want["used"][s]) / N and abs(r["dead"] + r["usage"] - 1) < 1e-12
            assert r["exclusive"] == want["exclusive"][s]
            assert len(r["load"]) == {64: 64, 100: 50, 256: 64}[N] and abs(sum(r["load"]) / len(r["load"]) - 1) < 1e-5
        for key, (overlap, jaccard) in want["pairs"].items():
            assert abs(pair[key]["overlap"] - overlap) < 1e-5 and abs(pair[key]["jaccard"] - jaccard) < 1e-12


def test_planted_extremes():
    same = torch.tensor([[1.0, 2.0, 0.0, 1.0], [2.0, 4.0, 0.0, 2.0]])  # the same distribution, twice the tokens
    rows = usage.summarise_sources(same, ["a", "b"])
    src, pair = rows[:2], rows[2]
    assert abs(src[0]["nmi"]) < 1e-12 and abs(pair["overlap"] - 1) < 1e-12 and pair["jaccard"] == 1
    assert abs(src[1]["mass_share"] - 2 / 3) < 1e-12 and src[0]["dead"] == 0.25 and src[0]["exclusive"] == 0
    apart = torch.tensor([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])  # no expert in common
    rows = usage.summarise_sources(apart, ["a", "b"])
    assert abs(rows[0]["nmi"] - 1) < 1e-12 and rows[2]["overlap"] == 0 and rows[2]["jaccard"] == 0
    assert rows[1]["exclusive"] == 0.25 and abs(rows[1]["kl_uniform"] - math.log(4)) < 1e-12
    alone = usage.summarise_sources(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), ["a", "b"])  # a sent no tokens
    assert math.isnan(alone[0]["nmi"]) and math.isnan(alone[0]["kl_uniform"]) and alone[0]["mass_share"] == 0
    assert math.isnan(alone[2]["overlap"]) and alone[2]["jaccard"] == 0


def reduce_member(out: str) -> None:
    """Each rank trains one forward on its own sources; both collect the summed tables."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model, layer = tracked(seed=0)  # the same weights on both ranks
    torch.manual_seed(10 + rank)
    usage.set_sources([layer], [[0, 1, 1], [2, 2, 0]][rank])
    with torch.no_grad():
        layer(torch.randn(3, 4, 16))
    local = layer.usage_by_source.clone()
    rows = usage.collect_by_source(model, 5, ["a", "b", "c"], distributed=True)
    torch.save({"local": local, "rows": rows}, Path(out, f"rank{rank}.pt"))


def test_tables_are_summed_across_workers(tmp_path):
    in_two_processes(reduce_member, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    want = usage.summarise_sources(ranks[0]["local"] + ranks[1]["local"], ["a", "b", "c"])
    for got in ranks:
        assert pd.DataFrame(got["rows"]).drop(columns=["step", "layer", "experts"]).equals(pd.DataFrame(want))
    shares = [r["mass_share"] for r in want if r["kind"] == "source"]
    assert [round(s * 6) for s in shares] == [2, 2, 2]  # two sequences of each source over the two ranks


def test_compiled_blocks_count_by_source_as_eager_without_recompiling():
    """torch.compile (aot_eager, whole graph) of the blocks: the same tables as eager; new source ids each step
    do not recompile."""
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    from peerlab.model import build_model
    from tests.conftest import tiny_model_config

    torch.manual_seed(0)
    eager = build_model(tiny_model_config()).train()
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    for block in compiled.layers:
        block.compile(backend=counter, fullgraph=True)
    layers = {m: usage.track_sources(m, 3) for m in (eager, compiled)}
    assert layers[eager]
    for step, sources in enumerate([[0, 2], [1, 1], [2, 0]]):
        ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(step))
        for model in (eager, compiled):
            usage.set_sources(layers[model], sources)
            model(ids[:, :-1], labels=ids[:, 1:]).backward()
        frames = counter.frame_count
        if step == 0:
            first = frames
    assert counter.frame_count == first  # compiled once per block, on the first step
    for a, b in zip(layers[eager], layers[compiled]):
        torch.testing.assert_close(b.usage_by_source, a.usage_by_source)
        torch.testing.assert_close(a.usage_by_source.sum(0), a.usage, rtol=1e-5, atol=1e-5)
        assert (a.usage_by_source.sum(1) > 0).all()  # every source was seen


def test_moe_counts_assignments_by_source():
    """An MoE layer's usage: each expert's token assignments, in all and by the source of each token."""
    from peerlab.config import MoEConfig
    from peerlab.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(MoEConfig(num_experts=6, top_k=2, expert_size=8), 16).train()
    model = nn.Sequential(moe)
    assert usage.track_moe(model) == 1 and usage.usage_layers(model) == [(0, moe)]
    layers = usage.track_sources(model, 3)
    x = torch.randn(4, 5, 16)
    sources = [1, 0, 1, 2]
    usage.set_sources(layers, sources)
    with torch.no_grad():
        _, _, expert = moe.route(x.reshape(-1, 16))
        moe(x)
    want = torch.zeros(3, 6)
    for t in range(20):
        for e in expert[t].tolist():
            want[sources[t // 5], e] += 1
    assert torch.equal(moe.usage_by_source, want) and torch.equal(moe.usage, want.sum(0))
    moe.eval()
    moe(x)
    assert torch.equal(moe.usage, want.sum(0))  # evaluation does not count
    row = usage.collect(model, 3, 2.0, distributed=False)[0]
    assert (
        row["experts"] == 6
        and "load_grid" not in row
        and abs(row["usage"] - (want.sum(0) > 0).double().mean().item()) < 1e-12
    )
    src = [r for r in usage.collect_by_source(model, 3, ["a", "b", "c"], False) if r["kind"] == "source"]
    assert [r["mass_share"] for r in src] == [0.25, 0.5, 0.25] and moe.usage.sum() == 0
