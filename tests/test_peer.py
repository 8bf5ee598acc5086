"""PEER: retrieval against brute force, output and gradients against slow references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peerlab.config import PeerConfig
from peerlab.model import search
from peerlab.model.peer import PEER, gather_dot, peer_experts, search_group, search_with_torch, topk_by_groups


def make_peer(n1, n2, k, heads, dim=16, query_dim=12, hidden=1, bn=True, seed=0) -> PEER:
    torch.manual_seed(seed)
    cfg = PeerConfig(
        num_experts=n1 * n2,
        product_key_dim=[n1, n2],
        num_experts_per_tok=k,
        num_heads=heads,
        query_dim=query_dim,
        expert_hidden_size=hidden,
        batch_norm_query=bn,
    )
    layer = PEER(cfg, dim).double()
    if bn:  # non-trivial BatchNorm statistics and affine terms
        layer.query_norm.running_mean.normal_()
        layer.query_norm.running_var.uniform_(0.5, 2.0)
        layer.query_norm.weight.data.uniform_(0.5, 1.5)
        layer.query_norm.bias.data.normal_(0, 0.1)
    return layer


def brute_force(layer: PEER, x: torch.Tensor):
    """Score all N experts of every head directly and take the top k.

    The sub-keys are one pair of sets for all heads (PEER), or one pair per head, head h's at rows
    h * (n1 + n2) onwards (PKM, Lample et al. 2019, Sec. 3.3).
    """
    q = layer.query(x)
    if layer.query_norm is not None:
        q = layer.query_norm(q)
    half = layer.query_dim // 2
    q = q.view(x.shape[0], layer.num_heads, 2, half)
    key_sets = layer.sub_keys.view(-1, layer.n1 + layer.n2, half)  # (1 or H, n1 + n2, half)
    experts = torch.arange(layer.num_experts)
    full = []
    for h in range(layer.num_heads):
        keys = key_sets[h if len(key_sets) > 1 else 0]
        keys1, keys2 = keys[: layer.n1], keys[layer.n1 :]
        full.append(q[:, h, 0] @ keys1[experts // layer.n2].t() + q[:, h, 1] @ keys2[experts % layer.n2].t())  # (M, N)
    return torch.stack(full, 1).topk(layer.k, dim=-1)  # (M, H, k) each


@pytest.mark.parametrize(
    "n1,n2,k,heads",
    # (256, 128, 8, 2): the search over the 256 first sub-keys goes through topk_by_groups
    [(8, 8, 4, 1), (16, 16, 8, 4), (32, 8, 8, 2), (5, 7, 5, 3), (64, 64, 16, 8), (16, 16, 1, 2), (256, 128, 8, 2)],
)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_retrieval_equals_brute_force_top_k(n1, n2, k, heads, training, grad):
    layer = make_peer(n1, n2, k, heads)
    layer.train(training)
    x = torch.randn(37, 16, dtype=torch.float64)
    with torch.set_grad_enabled(grad):  # with gradients the scores are recomputed from the winning sub-keys
        scores, indices = layer.retrieve(x)
    with torch.no_grad():
        want_scores, want_indices = brute_force(layer, x)
    assert scores.requires_grad == grad
    scores = scores.detach()
    assert scores.shape == indices.shape == (37, heads, k)
    torch.testing.assert_close(scores, want_scores, rtol=1e-10, atol=1e-10)
    # Same experts (scores are distinct in float64 on random data, so the order is the same too).
    assert torch.equal(indices.sort(-1).values, want_indices.sort(-1).values)
    assert torch.equal(indices, want_indices)


@pytest.mark.parametrize(
    "rows,n,k",
    [(300, 256, 8), (50, 1024, 16), (40, 512, 16), (64, 256, 16), (10, 64, 4), (7, 100, 3), (5, 24, 8), (90, 128, 8)],
)
def test_topk_by_groups_equals_topk(rows, n, k):
    torch.manual_seed(n + k)
    scores = torch.randn(rows, n)
    scores[0] = torch.arange(n, dtype=torch.float32)  # the best k all in one group's neighbourhood
    scores[1] = -torch.arange(n, dtype=torch.float32)
    values, columns = topk_by_groups(scores, k)
    want_values, want_columns = scores.topk(k, dim=-1)
    if (n, k) == (128, 8):
        assert search_group(n, k) == 4  # the case only groups of 4 serve
    assert torch.equal(values, want_values)
    assert torch.equal(columns, want_columns)


def rank_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [(a, b) for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k]
    return torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])


@pytest.mark.parametrize(
    "rows,n1,n2,k",
    [(500, 128, 128, 8), (100, 1024, 512, 16), (64, 13, 9, 5), (50, 8, 8, 8), (30, 20, 17, 1), (40, 64, 64, 32)],
)
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "plain"])
def test_search_kernel_equals_the_full_product_top_k(rows, n1, n2, k, simd):
    """The C search (model/search.py) against the top k of all n1 x n2 sums in float64, and torch's path."""
    if not search.available(torch.zeros(1)):
        pytest.skip("no C compiler: the search runs torch's ops")
    torch.manual_seed(rows + n1 + k)
    s1, s2 = torch.randn(rows, n1), torch.randn(rows, n2)
    s1[1] = torch.arange(n1, dtype=torch.float32)  # rising: every block of 8 beats the list so far
    s2[2] = -torch.arange(n2, dtype=torch.float32)  # falling: the first k are the best
    rank1, rank2 = rank_pairs(k)
    found = search.search(s1, s2, k, rank1, rank2, simd=simd)
    assert found is not None
    sums, i1, i2 = found
    full = (s1.double()[:, :, None] + s2.double()[:, None, :]).view(rows, -1)  # (rows, n1 * n2)
    want_sums, want = full.topk(k, dim=-1)
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-6, atol=1e-6)  # float32 sums
    assert torch.equal(i1 * n2 + i2, want)
    assert all(torch.equal(a, b) for a, b in zip(found, search_with_torch(s1, s2, k, rank1, rank2)))


def test_search_op_falls_back_to_torch_on_nan_and_other_dtypes():
    """A NaN score: the kernel declines and the op gives torch's ranking (NaN first); float64 runs torch's path."""
    torch.manual_seed(0)
    s1, s2 = torch.randn(20, 32), torch.randn(20, 24)
    s1[3, 5] = float("nan")
    rank1, rank2 = rank_pairs(4)
    assert search.search(s1, s2, 4, rank1, rank2) is None
    got = torch.ops.peerlab.product_key_search(s1, s2, 4, rank1, rank2)
    want = search_with_torch(s1, s2, 4, rank1, rank2)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and got[1][3, 0] == 5
    assert search.search(s1.double(), s2.double(), 4, rank1, rank2) is None
    s1[3, 5] = 0.0
    assert search.search(s1, s2, 4, rank1, rank2) is not None  # the valid case the checks below depart from
    for bad in (  # arguments the C loop must not index with: it declines and torch's path answers (or raises)
        (s1, s2, 0, rank1, rank2),  # k = 0
        (s1, s2, 4, rank1.int(), rank2.int()),  # 32-bit ranks
        (s1, s2, 4, rank1 + 100_000, rank2),  # ranks past the k-entry lists
        (s1, s2, 4, rank1, rank2 - 1),  # and before them
        (s1, s2, 4, rank1[:3], rank2[:3]),  # fewer pairs than k
    ):
        assert search.search(*bad) is None
    overflow = torch.full((5, 16), -3e38)  # every sum rounds to -inf: fewer than k sums above it
    assert search.search(overflow, overflow.clone(), 4, rank1, rank2) is None


def test_float32_retrieval_equals_brute_force_in_float64():
    """The layer's float32 retrieval (the C search on the CPU) picks the experts a float64 brute force does."""
    layer = make_peer(128, 128, 8, 4, dim=32, query_dim=64).eval()
    x = torch.randn(300, 32, dtype=torch.float64)
    want_scores, want = brute_force(layer, x)
    with torch.no_grad():
        scores, indices = layer.float().retrieve(x.float())
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(indices, want)


def test_retrieve_keeps_leading_dims():
    layer = make_peer(8, 8, 4, 2).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    scores, indices = layer.retrieve(x)
    assert scores.shape == indices.shape == (2, 5, 2, 4)
    assert int(indices.min()) >= 0 and int(indices.max()) < 64


def reference_output(layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """Slow loop over tokens, heads and retrieved experts (paper Eq. 4-5)."""
    scores, indices = layer.retrieve(x)
    gates = torch.softmax(scores, dim=-1)
    h = layer.expert_hidden_size
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for head in range(layer.num_heads):
            for j in range(layer.k):
                e = int(indices[t, head, j])
                for r in range(h):
                    row = e * h + r
                    out[t] += gates[t, head, j] * F.gelu(layer.down[row] @ x[t]) * layer.up[row]
    return out


@pytest.mark.parametrize("hidden", [1, 3])
@pytest.mark.parametrize("bn", [True, False])
def test_output_equals_reference_loop(hidden, bn):
    layer = make_peer(8, 8, 4, 3, hidden=hidden, bn=bn).eval()
    with torch.no_grad():
        layer.down.normal_(0, 0.5)
        layer.up.normal_(0, 0.5)
    x = torch.randn(9, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-10, atol=1e-12)


def test_peer_experts_gradients_match_finite_differences():
    torch.manual_seed(1)
    M, S, d, R = 6, 5, 4, 11
    x = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, R, (M, S))
    idx[0, 1] = idx[0, 0]  # the same row twice in one bag, and rows shared across tokens
    gate = torch.rand(M, S, dtype=torch.float64, requires_grad=True)
    down = torch.randn(R, d, dtype=torch.float64, requires_grad=True)
    up = torch.randn(R, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: peer_experts(a[0], idx, *a[1:]), (x, gate, down, up))
    vectors = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, v: gather_dot(t, idx, v), (down, vectors))


def test_layer_gradients_match_dense_autograd_reference():
    """The whole layer's gradients equal autograd through gathered rows and top-k."""
    layer = make_peer(8, 8, 4, 2, hidden=2).train()
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *layer.parameters()])

    def reference(x):
        q = layer.query_norm(layer.query(x)).view(x.shape[0], layer.num_heads, 2, -1)
        s1 = q[:, :, 0] @ layer.sub_keys[: layer.n1].t()
        s2 = q[:, :, 1] @ layer.sub_keys[layer.n1 :].t()
        full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (M, H, N)
        scores, experts = full.topk(layer.k, dim=-1)
        gates = torch.softmax(scores, -1).repeat_interleave(2, -1)  # (M, H, k*h)
        rows = (experts.unsqueeze(-1) * 2 + torch.arange(2)).flatten(-2)  # (M, H, k*h)
        hidden = torch.einsum("mhsd,md->mhs", layer.down[rows], x)
        return torch.einsum("mhs,mhsd->md", gates * F.gelu(hidden), layer.up[rows])

    layer.query_norm.reset_running_stats()
    want = torch.autograd.grad(reference(x).pow(2).sum(), [x, *layer.parameters()])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_gradient_reaches_only_retrieved_rows():
    layer = make_peer(16, 16, 2, 1, bn=False).float().train()
    x = torch.randn(3, 16)
    _, indices = layer.retrieve(x)
    layer(x).sum().backward()
    touched = torch.zeros(256, dtype=torch.bool)
    touched[indices.flatten()] = True
    for table in (layer.down, layer.up):
        assert table.grad.shape == table.shape
        assert (table.grad[~touched] == 0).all()
        assert (table.grad[touched].abs().sum(-1) > 0).all()
    used_keys = torch.zeros(32, dtype=torch.bool)
    used_keys[indices.flatten() // 16] = True
    used_keys[16 + indices.flatten() % 16] = True
    assert (layer.sub_keys.grad[~used_keys] == 0).all()


def test_bfloat16_and_autocast_run():
    layer = make_peer(16, 16, 4, 2).float().eval()
    with torch.no_grad():
        layer.down.normal_(0, 0.5)
        layer.up.normal_(0, 0.5)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        ref = layer(x)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ((layer(x).float() - ref).norm() / ref.norm()).item() < 0.15  # rounding, not a broken kernel
    y.float().sum().backward()
    assert layer.down.grad.dtype == torch.float32
    bf = make_peer(16, 16, 4, 2).to(torch.bfloat16)
    out = bf(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gathered_dots_equal_embedding_bag_dots():
    """The GPU path of Bags.dots (gathered rows, in chunks) gives the CPU kernel's result."""
    from peerlab.model.peer import Bags

    idx = torch.randint(0, 50, (13, 7))
    table, vectors = torch.randn(50, 6, dtype=torch.float64), torch.randn(13, 6, dtype=torch.float64)
    bags = Bags(idx, 50)
    want = (table[idx] * vectors[:, None]).sum(-1)
    torch.testing.assert_close(bags.dots(table, vectors), want)
    torch.testing.assert_close(bags.gathered_dots(table, vectors, chunk_bytes=3 * 7 * 6 * 8), want)
    torch.testing.assert_close(bags.sort().dots(table, vectors), want)


def test_usage_mass_is_the_router_scores_of_retrieved_experts():
    layer = make_peer(8, 8, 4, 2).float().train()
    x = torch.randn(12, 16)
    with torch.no_grad():
        scores, indices = layer.retrieve(x)  # the same batch statistics as the forward below
        layer(x)
    want = torch.zeros(64).index_add_(0, indices.flatten(), torch.softmax(scores, -1).flatten())
    torch.testing.assert_close(layer.usage, want)
    assert abs(layer.usage.sum().item() - 12 * 2) < 1e-4  # each token and head hands out a mass of 1
    layer.eval()
    before = layer.usage.clone()
    layer(x)
    assert torch.equal(layer.usage, before)  # evaluation does not count


def test_usage_summary_on_planted_distributions():
    from peerlab.train.usage import summarise

    even = summarise(torch.ones(1000), threshold=5.0)
    assert even["usage"] == 1.0 and abs(even["kl_uniform"]) < 1e-12 and even["dead"] == 0 and even["hot_count"] == 0
    one = torch.zeros(1000)
    one[7] = 3.0
    single = summarise(one, threshold=5.0)
    assert single["usage"] == 0.001 and abs(single["kl_uniform"] - math.log(1000)) < 1e-9
    assert single["hot_ids"] == [7] and single["hot_count"] == 1 and single["dead"] == 0.999
    planted = torch.ones(1000)
    planted[[3, 500]] = torch.tensor([40.0, 10.0])  # 40 / 1048 > 5 / 1000, 10 / 1048 > 5 / 1000 too; 1 / 1048 is not
    hot = summarise(planted, threshold=5.0)
    assert hot["hot_ids"] == [3, 500] and hot["hot_count"] == 2 and hot["usage"] == 1.0
