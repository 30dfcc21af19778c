"""GraphAggregation and LMGA modules: size, index rules, backends."""

import pytest
import torch

from megan_fast.models.blocks import LMGA
from megan_fast.nn import GraphAggregation
from megan_fast.ops import use_backend
from megan_fast.reference import graph_aggregate_reference


def test_default_lmga_has_0_32m_parameters():
    assert sum(p.numel() for p in LMGA().parameters()) == 318_016


def test_graph_aggregation_module_calls_the_op():
    layer = GraphAggregation(6, hidden=4)
    nodes = torch.randn(2, 3, 6, 4, 5)
    out, adj = layer(nodes, return_adjacency=True)
    ref_out, ref_adj = graph_aggregate_reference(nodes, layer.w1, layer.b1, layer.w2, 0.2, True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adj, ref_adj, atol=1e-6, rtol=1e-5)
    assert "hidden=4" in repr(layer)


def test_eval_indices_are_evenly_spaced_and_fixed():
    m = LMGA(nf=8, tau=4).eval()
    assert m.memory_indices(7) == [0, 2, 4, 6]
    assert m.memory_indices(7) == m.memory_indices(7)
    assert m.memory_indices(3) == [0, 1, 1, 2]  # T < tau: repeats
    assert m.memory_indices(1) == [0, 0, 0, 0]


def test_training_indices_are_random_permutation_draws_from_a_seeded_generator():
    a, b = LMGA(nf=8, tau=4, seed=3).train(), LMGA(nf=8, tau=4, seed=3).train()
    draws_a = [a.memory_indices(7) for _ in range(20)]
    draws_b = [b.memory_indices(7) for _ in range(20)]
    assert draws_a == draws_b  # same seed, same sequence
    assert all(len(set(d)) == 4 and all(0 <= i < 7 for i in d) for d in draws_a)  # no repeats when T >= tau
    assert len({tuple(d) for d in draws_a}) > 1  # it is random
    short = [a.memory_indices(2) for _ in range(20)]
    assert all(len(d) == 4 and set(d) <= {0, 1} for d in short)  # T < tau: with replacement


def test_training_indices_follow_the_global_seed_without_own_generator():
    m = LMGA(nf=8, tau=3).train()
    torch.manual_seed(11)
    first = [m.memory_indices(9) for _ in range(5)]
    torch.manual_seed(11)
    assert [m.memory_indices(9) for _ in range(5)] == first


def test_forward_shapes_fixed_indices_and_gradients():
    torch.manual_seed(0)
    m = LMGA(nf=8, tau=3, num_layers=2, hidden=4).train()
    feats = torch.randn(2, 5, 8, 6, 7, requires_grad=True)
    y1 = m(feats, memory_indices=[0, 2, 4])
    y2 = m(feats, memory_indices=[0, 2, 4])
    assert y1.shape == feats.shape
    torch.testing.assert_close(y1, y2)
    y1.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match=r"memory_indices must be 3 frame indices in \[0, 5\)"):
        m(feats, memory_indices=[0, 9, 1])
    with pytest.raises(ValueError, match=r"feats must have shape \(b, T, 8, h, w\)"):
        m(feats[:, :, :4])


def test_backends_agree():
    torch.manual_seed(0)
    m = LMGA(nf=8, tau=2, hidden=4).double().eval()
    feats = torch.randn(1, 3, 8, 5, 4, dtype=torch.float64)
    with use_backend("reference"):
        ref = m(feats)
    with use_backend("native"):  # the C++ kernels (tests/test_ops_registration.py requires them)
        out = m(feats)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
