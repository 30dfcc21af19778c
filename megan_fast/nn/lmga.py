"""Long-range memory graph aggregation (LMGA): MEGAN's graph attention over memory frames."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megan_fast.ops.graph_aggregate import graph_aggregate


class GraphAggregation(nn.Module):
    """Learned per-pixel graph aggregation over p nodes (:func:`megan_fast.ops.graph_aggregate`).

    Holds the edge MLP: ``w1`` (hidden, channels), ``b1`` (hidden,), ``w2``
    (hidden,), initialised like ``nn.Linear(channels, hidden)`` followed by
    ``nn.Linear(hidden, 1, bias=False)``.

    Shape:
        nodes (b, p, channels, h, w) -> (b, p, channels, h, w); with
        ``return_adjacency`` also A (b, p, p, h, w).
    """

    def __init__(self, channels: int = 64, hidden: int = 16, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.channels, self.hidden, self.negative_slope = channels, hidden, float(negative_slope)
        self.w1 = nn.Parameter(torch.empty(hidden, channels))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.empty(hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))
        bound1 = 1 / math.sqrt(self.channels)
        nn.init.uniform_(self.b1, -bound1, bound1)
        bound2 = 1 / math.sqrt(self.hidden)
        nn.init.uniform_(self.w2, -bound2, bound2)

    def forward(self, nodes: Tensor, return_adjacency: bool = False):
        return graph_aggregate(nodes, self.w1, self.b1, self.w2, self.negative_slope, return_adjacency)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, negative_slope={self.negative_slope}"


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class LMGA(nn.Module):
    """Long-range memory graph aggregation (docs/DESIGN.md section 3).

    For every key frame t of a sequence of T frame features, a graph of
    p = tau + 1 nodes: node 0 is F_t, node j is ``N_g(cat(F_t, F_mem_j))`` for
    the j-th memory frame.  ``num_layers`` graph layers update the nodes,
    ``E <- E + lrelu(conv_k(graph_aggregate(E)))``; each node is refined, the
    nodes are concatenated and fused by a 1x1 conv, and F_t is added.

    Memory frames: in training, ``tau`` indices of a random permutation of the
    T frames (drawn with replacement when T < tau) from the module's own
    generator if ``seed`` is given, else from torch's global RNG
    (:meth:`draw_memory_indices`); in eval, ``round(linspace(0, T-1, tau))``
    computed on the host (:meth:`eval_indices`).  ``forward(..., memory_indices=...)`` fixes them: a
    list of ints, or an int64 tensor (a device index, as a captured training
    step passes it).

    Args:
        nf: feature channels.
        tau: number of memory frames.
        num_layers: graph layers (K).
        hidden: hidden width of each graph layer's edge MLP.
        graph_slope: leaky ReLU slope inside the edge MLP.
        seed: seed of the module's generator for the training draws (None:
            use torch's global RNG).

    Shape:
        feats (b, T, nf, h, w) -> (b, T, nf, h, w).
    """

    def __init__(
        self,
        nf: int = 64,
        tau: int = 4,
        num_layers: int = 2,
        hidden: int = 16,
        graph_slope: float = 0.2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if tau < 1:
            raise ValueError(f"LMGA: tau must be >= 1 (the graph needs p = tau + 1 >= 2 nodes), got {tau}")
        self.nf, self.tau, self.num_layers = nf, tau, num_layers
        self.node_embed = nn.Sequential(  # N_g
            _conv3x3(2 * nf, nf), nn.LeakyReLU(0.1, inplace=True),
            _conv3x3(nf, nf), nn.LeakyReLU(0.1, inplace=True),
            _conv3x3(nf, nf),
        )
        self.graph_layers = nn.ModuleList(GraphAggregation(nf, hidden, graph_slope) for _ in range(num_layers))
        self.graph_convs = nn.ModuleList(_conv3x3(nf, nf) for _ in range(num_layers))
        self.refine = nn.Sequential(_conv3x3(nf, nf), nn.LeakyReLU(0.1, inplace=True), _conv3x3(nf, nf))
        self.fusion = nn.Conv2d((tau + 1) * nf, nf, 1)
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def memory_indices(self, num_frames: int) -> list[int]:
        """The memory frame indices a forward pass without ``memory_indices`` uses (a fresh draw in training)."""
        if num_frames < 1:
            raise ValueError(f"LMGA: the sequence must have at least one frame, got {num_frames}")
        if not self.training:
            return self.eval_indices(num_frames, self.tau)
        return self.draw_memory_indices(num_frames).tolist()

    @staticmethod
    def eval_indices(num_frames: int, tau: int) -> list[int]:
        """``torch.linspace(0, num_frames - 1, tau).round()`` computed on the host, as torch computes it.

        torch's CPU linspace works in float32 (from the start for the first
        half, back from the end for the second half); numpy's float32
        arithmetic gives the same values, and ``rint`` the same ties to even,
        without a tensor op (no host sync, nothing for a graph to capture).
        """
        if tau == 1:
            return [0]
        end = np.float32(num_frames - 1)
        step = end / np.float32(tau - 1)
        values = (step * np.float32(i) if i < tau // 2 else end - step * np.float32(tau - 1 - i) for i in range(tau))
        return [int(np.rint(v)) for v in values]

    def draw_memory_indices(self, num_frames: int) -> Tensor:
        """One training draw as a CPU int64 tensor of ``tau`` frame indices (no device work, no host sync).

        ``tau`` of a random permutation of the frames (with replacement when
        there are fewer than ``tau``), from the module's generator if it has a
        seed, else from torch's global RNG.  A training loop that captures
        its step (CUDA graphs, ``torch.compile``) draws here and passes the
        tensor to ``forward``, so every replay gets fresh draws.
        """
        if num_frames < self.tau:
            return torch.randint(num_frames, (self.tau,), generator=self.generator)
        return torch.randperm(num_frames, generator=self.generator)[: self.tau]

    def forward(self, feats: Tensor, memory_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        if feats.dim() != 5 or feats.shape[2] != self.nf:
            raise ValueError(f"LMGA: feats must have shape (b, T, {self.nf}, h, w), got {tuple(feats.shape)}")
        b, t, c, h, w = feats.shape
        if memory_indices is None and self.training:
            memory_indices = self.draw_memory_indices(t)
        if isinstance(memory_indices, Tensor):
            # Values are not checked here (that would wait for the device); index_select refuses out-of-range ones.
            if memory_indices.shape != (self.tau,) or memory_indices.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"LMGA: memory_indices must be an int64 (or int32) tensor of shape ({self.tau},) with "
                                 f"values in [0, T), got "
                                 f"{memory_indices.dtype} of shape {tuple(memory_indices.shape)}")
            memory = feats.index_select(1, memory_indices.to(feats.device, non_blocking=True))
        else:
            if memory_indices is None:
                memory_indices = self.eval_indices(t, self.tau)
            memory_indices = [int(i) for i in memory_indices]
            if len(memory_indices) != self.tau or not all(-t <= i < t for i in memory_indices):
                raise ValueError(
                    f"LMGA: memory_indices must be {self.tau} frame indices in [0, {t}), got {memory_indices}"
                )
            memory = torch.stack([feats[:, i] for i in memory_indices], 1)  # (b, tau, c, h, w)
        p = self.tau + 1
        # Node j >= 1 of key frame t: N_g(cat(F_t, F_mem_j)), for all (t, j) at once.
        pairs = torch.cat(
            (feats.unsqueeze(2).expand(b, t, self.tau, c, h, w), memory.unsqueeze(1).expand(b, t, self.tau, c, h, w)),
            dim=3,
        )
        embedded = self.node_embed(pairs.reshape(b * t * self.tau, 2 * c, h, w)).reshape(b * t, self.tau, c, h, w)
        nodes = torch.cat((feats.reshape(b * t, 1, c, h, w), embedded), dim=1)  # (b*T, p, c, h, w)
        for graph, conv in zip(self.graph_layers, self.graph_convs):
            message = graph(nodes).reshape(b * t * p, c, h, w)
            nodes = nodes + F.leaky_relu(conv(message), 0.1).reshape(b * t, p, c, h, w)
        refined = self.refine(nodes.reshape(b * t * p, c, h, w)).reshape(b * t, p * c, h, w)
        out = self.fusion(refined).reshape(b, t, c, h, w)
        return out + feats
