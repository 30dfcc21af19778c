"""Building blocks of MEGAN (after Zooming Slow-Mo and EDVR) and of its relatives, each a small named module."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megan_fast.nn import DCNPack, GraphAggregation
from megan_fast.ops.upsample import upsample_bilinear2x


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1)


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.1)


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(x))), no batch norm; kaiming init scaled by 0.1 (EDVR's ResidualBlockNoBN)."""

    def __init__(self, nf: int = 64) -> None:
        super().__init__()
        self.conv1 = conv3x3(nf, nf)
        self.conv2 = conv3x3(nf, nf)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def make_residual_trunk(nf: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(nf) for _ in range(n)))


class FeaturePyramid(nn.Module):
    """L1 -> (L1, L2, L3): two stride-2 levels, L_{k+1} = lrelu(conv(lrelu(conv_s2(L_k))))."""

    def __init__(self, nf: int = 64) -> None:
        super().__init__()
        self.l2_conv1 = conv3x3(nf, nf, 2)
        self.l2_conv2 = conv3x3(nf, nf)
        self.l3_conv1 = conv3x3(nf, nf, 2)
        self.l3_conv2 = conv3x3(nf, nf)

    def forward(self, l1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        l2 = lrelu(self.l2_conv2(lrelu(self.l2_conv1(l1))))
        l3 = lrelu(self.l3_conv2(lrelu(self.l3_conv1(l2))))
        return l1, l2, l3


class TimeModulation(nn.Module):
    """TMNet's temporal modulation block: features(x) * time_mlp(t), added to a PCD level's offset features.

    ``time_mlp``: three 1x1 convs without bias (1 -> nf -> nf -> nf), each
    followed by a leaky ReLU, over the time mapped to [-1, 1] (one value per
    sample, shape (b, 1, 1, 1)): a per-channel modulation vector.
    ``features``: two 3x3 convs with leaky ReLUs over the offset features.
    """

    def __init__(self, nf: int = 64) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(
            nn.Conv2d(1, nf, 1, bias=False), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, nf, 1, bias=False), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, nf, 1, bias=False), nn.LeakyReLU(0.1),
        )
        self.features = nn.Sequential(conv3x3(nf, nf), nn.LeakyReLU(0.1), conv3x3(nf, nf), nn.LeakyReLU(0.1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.features(x) * self.time_mlp(t)


class PyramidAlign(nn.Module):
    """One direction of PCD alignment: aligns pyramid ``a`` towards pyramid ``b``.

    Coarse to fine: offsets are predicted from cat(a, b) at each level, the
    coarser level's offset features are upsampled x2 and doubled (one op,
    :func:`megan_fast.ops.upsample_bilinear2x`), and DCNPack
    samples ``a``; aligned features are merged with the upsampled coarser result.
    """

    def __init__(self, nf: int = 64, deformable_groups: int = 8, time_modulation: bool = False) -> None:
        super().__init__()
        self.l3_offset_conv1 = conv3x3(2 * nf, nf)
        self.l3_offset_conv2 = conv3x3(nf, nf)
        self.l3_dcn = DCNPack(nf, nf, 3, padding=1, deformable_groups=deformable_groups)
        # Levels 2 and 1 (the state-dict keys of Zooming Slow-Mo and the demo checkpoint).
        self.l2_offset_conv1 = conv3x3(2 * nf, nf)
        self.l2_offset_conv2 = conv3x3(2 * nf, nf)
        self.l2_offset_conv3 = conv3x3(nf, nf)
        self.l2_dcn = DCNPack(nf, nf, 3, padding=1, deformable_groups=deformable_groups)
        self.l2_fea_conv = conv3x3(2 * nf, nf)
        self.l1_offset_conv1 = conv3x3(2 * nf, nf)
        self.l1_offset_conv2 = conv3x3(2 * nf, nf)
        self.l1_offset_conv3 = conv3x3(nf, nf)
        self.l1_dcn = DCNPack(nf, nf, 3, padding=1, deformable_groups=deformable_groups)
        self.l1_fea_conv = conv3x3(2 * nf, nf)
        # TMNet: one temporal modulation per level, added to the level's offset features.
        tm = (lambda: TimeModulation(nf)) if time_modulation else (lambda: None)
        self.l3_time, self.l2_time, self.l1_time = tm(), tm(), tm()

    def forward(self, a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor],
                t: Tensor | None = None) -> Tensor:
        """``t`` (time modulation only): the time mapped to [-1, 1], shape (batch, 1, 1, 1)."""
        offset_in = lrelu(self.l3_offset_conv1(torch.cat((a[2], b[2]), 1)))
        offset = lrelu(self.l3_offset_conv2(offset_in))
        if t is not None:
            offset = offset + self.l3_time(offset_in, t)
        fea = lrelu(self.l3_dcn(a[2], offset))
        levels = (
            (1, self.l2_offset_conv1, self.l2_offset_conv2, self.l2_offset_conv3, self.l2_dcn, self.l2_fea_conv,
             self.l2_time),
            (0, self.l1_offset_conv1, self.l1_offset_conv2, self.l1_offset_conv3, self.l1_dcn, self.l1_fea_conv,
             self.l1_time),
        )
        for i, conv1, conv2, conv3, dcn, fea_conv, time in levels:
            new_offset = lrelu(conv1(torch.cat((a[i], b[i]), 1)))
            new_offset = lrelu(conv2(torch.cat((new_offset, upsample_bilinear2x(offset, 2.0)), 1)))
            offset = lrelu(conv3(new_offset))
            if t is not None:
                offset = offset + time(new_offset, t)
            fea = fea_conv(torch.cat((dcn(a[i], offset), upsample_bilinear2x(fea)), 1))
            if i == 1:  # level 2's features go through a leaky ReLU, level 1's (the output) do not
                fea = lrelu(fea)
        return fea


class PCDAlign(nn.Module):
    """Bidirectional PCD alignment of two pyramids, fused by a 1x1 conv.

    Aligns ``f1`` towards ``f2`` and ``f2`` towards ``f1`` with separate
    weights and fuses both into one feature map: the interpolated frame
    feature between them (Zooming Slow-Mo's frame feature interpolation).
    """

    def __init__(self, nf: int = 64, deformable_groups: int = 8, time_modulation: bool = False) -> None:
        super().__init__()
        self.align_1to2 = PyramidAlign(nf, deformable_groups, time_modulation)
        self.align_2to1 = PyramidAlign(nf, deformable_groups, time_modulation)
        self.fusion = nn.Conv2d(2 * nf, nf, 1)

    def forward(self, f1, f2, t: Tensor | None = None) -> Tensor:
        """``t`` (TMNet's time modulation only): the time of the feature to make, in (0, 1), shape
        (batch, 1, 1, 1).  The f1 -> f2 branch is modulated by t, the f2 -> f1 branch by 1 - t, each mapped
        to [-1, 1] (x / 0.5 - 1, as the official code does)."""
        if t is None:
            return self.fusion(torch.cat((self.align_1to2(f1, f2), self.align_2to1(f2, f1)), 1))
        forward, backward = t / 0.5 - 1, (1 - t) / 0.5 - 1
        return self.fusion(torch.cat((self.align_1to2(f1, f2, forward), self.align_2to1(f2, f1, backward)), 1))


class EasyPCD(nn.Module):
    """PCD alignment of two single-level features: builds their pyramids first (own weights)."""

    def __init__(self, nf: int = 64, deformable_groups: int = 8) -> None:
        super().__init__()
        self.pyramid = FeaturePyramid(nf)
        self.pcd = PCDAlign(nf, deformable_groups)

    def forward(self, f1: Tensor, f2: Tensor) -> Tensor:
        b = f1.shape[0]
        levels = self.pyramid(torch.cat((f1, f2), 0))  # both pyramids in one batch
        return self.pcd(tuple(x[:b] for x in levels), tuple(x[b:] for x in levels))

    def align(self, f1_levels: tuple[Tensor, Tensor, Tensor], f2: Tensor) -> Tensor:
        """``forward(f1, f2)`` with f1's pyramid given (``self.pyramid(f1)``, computed once for many calls)."""
        return self.pcd(f1_levels, self.pyramid(f2))


class DeformableConvLSTM(nn.Module):
    """Bidirectional deformable ConvLSTM (Zooming Slow-Mo).

    The same cell runs over the sequence and over its reverse.  At each step
    the hidden and cell states are first aligned to the input with their own
    pyramid + PCD (``pcd_h``, ``pcd_c``); the cell is one 3x3 conv over
    cat(x, h) giving the gates i, f, o, g.  Each step's output is a 1x1 conv
    over [h_forward, h_backward].

    Both directions share every weight, so they run as one batch of 2b
    sequences (rows b.. are the reversed sequences): T sequential steps, not
    2T.  The inputs' pyramids do not depend on the states, so they are built
    for all steps in one call before the loop (docs/DESIGN.md section 3).

    Shape: (b, T, nf, h, w) -> (b, T, nf, h, w).
    """

    def __init__(self, nf: int = 64, deformable_groups: int = 8) -> None:
        super().__init__()
        self.nf = nf
        self.pcd_h = EasyPCD(nf, deformable_groups)
        self.pcd_c = EasyPCD(nf, deformable_groups)
        self.cell = nn.Conv2d(2 * nf, 4 * nf, 3, 1, 1)
        self.fusion = nn.Conv2d(2 * nf, nf, 1)

    def step(self, x_h: tuple[Tensor, Tensor, Tensor], x_c: tuple[Tensor, Tensor, Tensor],
             h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One step: input pyramids under ``pcd_h`` and ``pcd_c`` (level 1 is the input), states -> new states."""
        h = self.pcd_h.align(x_h, h)
        c = self.pcd_c.align(x_c, c)
        ifo, g = self.cell(torch.cat((x_h[0], h), 1)).split((3 * self.nf, self.nf), 1)
        i, f, o = torch.sigmoid(ifo).chunk(3, 1)
        c = torch.addcmul(f * c, i, torch.tanh(g))
        return o * torch.tanh(c), c

    def forward(self, x: Tensor) -> Tensor:
        b, t, c, hh, ww = x.shape
        # (T, 2b, ...): step s holds frame s of each sequence, then frame T-1-s of each (the reversed ones).
        seq = torch.cat((x.transpose(0, 1), x.flip(1).transpose(0, 1)), 1)
        steps = seq.unbind(0)

        def pyramid_steps(pyramid: FeaturePyramid) -> list[tuple[Tensor, Tensor, Tensor]]:
            _, l2, l3 = pyramid(seq.reshape(t * 2 * b, c, hh, ww))
            return list(zip(steps, l2.reshape(t, 2 * b, *l2.shape[1:]).unbind(0),
                            l3.reshape(t, 2 * b, *l3.shape[1:]).unbind(0)))

        x_h, x_c = pyramid_steps(self.pcd_h.pyramid), pyramid_steps(self.pcd_c.pyramid)
        h = torch.zeros_like(steps[0])  # zero states on the input's device and dtype
        state = h
        outputs = []
        for s in range(t):
            h, state = self.step(x_h[s], x_c[s], h, state)
            outputs.append(h)
        hs = torch.stack(outputs, 0)  # (T, 2b, c, hh, ww)
        forward, backward = hs[:, :b], hs.flip(0)[:, b:]
        fused = torch.cat((forward.transpose(0, 1), backward.transpose(0, 1)), 2)  # (b, T, 2c, hh, ww)
        return self.fusion(fused.reshape(b * t, 2 * c, hh, ww)).reshape(b, t, c, hh, ww)


class NeighbourComparison(nn.Module):
    """TMNet's "non-linear comparison" before the ConvLSTM: each frame feature plus what its neighbours add.

    For every frame feature f_i of the sequence, its previous and next
    neighbours (the frame itself at the ends) are aligned to it by a DCN
    whose offset features are two 3x3 convs over cat(neighbour, f_i); the
    three maps (previous aligned, f_i, next aligned) are fused by four 1x1
    convs (3nf -> 3nf x 3 with leaky ReLUs -> nf) and added to f_i.
    All frames at once.  Shape: (b, T, nf, h, w) -> same.
    """

    def __init__(self, nf: int = 64, deformable_groups: int = 8) -> None:
        super().__init__()

        def offsets() -> nn.Sequential:
            return nn.Sequential(conv3x3(2 * nf, nf), nn.LeakyReLU(0.1), conv3x3(nf, nf))

        self.offset_prev, self.offset_next = offsets(), offsets()
        self.dcn_prev = DCNPack(nf, nf, 3, padding=1, deformable_groups=deformable_groups)
        self.dcn_next = DCNPack(nf, nf, 3, padding=1, deformable_groups=deformable_groups)
        self.fusion = nn.Sequential(
            nn.Conv2d(3 * nf, 3 * nf, 1), nn.LeakyReLU(0.1), nn.Conv2d(3 * nf, 3 * nf, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(3 * nf, 3 * nf, 1), nn.LeakyReLU(0.1), nn.Conv2d(3 * nf, nf, 1),
        )

    def forward(self, seq: Tensor) -> Tensor:
        b, t, c, h, w = seq.shape
        prev = torch.cat((seq[:, :1], seq[:, :-1]), 1).reshape(b * t, c, h, w)
        nxt = torch.cat((seq[:, 1:], seq[:, -1:]), 1).reshape(b * t, c, h, w)
        cur = seq.reshape(b * t, c, h, w)
        prev = lrelu(self.dcn_prev(prev, self.offset_prev(torch.cat((prev, cur), 1))))
        nxt = lrelu(self.dcn_next(nxt, self.offset_next(torch.cat((nxt, cur), 1))))
        return seq + self.fusion(torch.cat((prev, cur, nxt), 1)).reshape(b, t, c, h, w)


class PFRDB(nn.Module):
    """Progressive fusion residual dense block over T frames (weights shared over frames).

    I1_t = lrelu(conv(I0_t)); base = lrelu(conv1x1(cat_t I1_t)); I2_t = lrelu(conv(cat(base, I1_t)));
    I0_t + I2_t.  Shape: (b, T, nf, h, w) -> same.
    """

    def __init__(self, nf: int = 64, num_frames: int = 7) -> None:
        super().__init__()
        self.conv_in = conv3x3(nf, nf)
        self.conv_base = nn.Conv2d(num_frames * nf, nf, 1)
        self.conv_out = conv3x3(2 * nf, nf)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        i1 = lrelu(self.conv_in(x.reshape(b * t, c, h, w)))
        base = lrelu(self.conv_base(i1.reshape(b, t * c, h, w)))
        base = base.unsqueeze(1).expand(b, t, c, h, w).reshape(b * t, c, h, w)
        i2 = lrelu(self.conv_out(torch.cat((base, i1), 1)))
        return x + i2.reshape(b, t, c, h, w)


class Reconstruction(nn.Module):
    """Per-frame reconstruction: residual trunk, two (conv, PixelShuffle(2), lrelu), conv+lrelu, conv to RGB."""

    def __init__(self, nf: int = 64, num_blocks: int = 20, out_channels: int = 3) -> None:
        super().__init__()
        self.trunk = make_residual_trunk(nf, num_blocks)
        self.upconv1 = nn.Conv2d(nf, nf * 4, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf, nf * 4, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.conv_hr = conv3x3(nf, nf)
        self.conv_last = conv3x3(nf, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """``skip`` (TMNet): features added to the trunk's output before the upsampling."""
        x = self.trunk(x)
        if skip is not None:
            x = x + skip
        x = lrelu(self.pixel_shuffle(self.upconv1(x)))
        x = lrelu(self.pixel_shuffle(self.upconv2(x)))
        return self.conv_last(lrelu(self.conv_hr(x)))


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
            conv3x3(2 * nf, nf), nn.LeakyReLU(0.1, inplace=True),
            conv3x3(nf, nf), nn.LeakyReLU(0.1, inplace=True),
            conv3x3(nf, nf),
        )
        self.graph_layers = nn.ModuleList(GraphAggregation(nf, hidden, graph_slope) for _ in range(num_layers))
        self.graph_convs = nn.ModuleList(conv3x3(nf, nf) for _ in range(num_layers))
        self.refine = nn.Sequential(conv3x3(nf, nf), nn.LeakyReLU(0.1, inplace=True), conv3x3(nf, nf))
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
