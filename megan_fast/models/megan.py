"""MEGAN: Memory Enhanced Graph Attention Network for space-time video super-resolution (the network).

The same class builds the family's other members from their configs
(:mod:`megan_fast.models.config`): Zooming Slow-Mo and TMNet.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megan_fast.models.baseline import bicubic_blend
from megan_fast.models.blocks import (
    LMGA,
    PCDAlign,
    DeformableConvLSTM,
    FeaturePyramid,
    NeighbourComparison,
    PFRDB,
    Reconstruction,
    lrelu,
    make_residual_trunk,
)
from megan_fast.models.config import MEGANConfig, output_frames
from megan_fast.models.inputs import check_input, check_times
from megan_fast.nn import NonLocalBlock

__all__ = ["MEGAN", "MEGANConfig", "output_frames"]


class FeatureExtractor(nn.Module):
    """conv_first + lrelu, non-local block, residual blocks, non-local block, 3-level pyramid.

    ``nonlocal_blocks=False`` (Zooming Slow-Mo): no non-local blocks.
    """

    def __init__(self, cfg: MEGANConfig) -> None:
        super().__init__()
        nf = cfg.nf
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.nonlocal_in = NonLocalBlock(nf, cfg.nonlocal_inner, cfg.nonlocal_scale) if cfg.nonlocal_blocks else None
        self.trunk = make_residual_trunk(nf, cfg.front_blocks)
        self.nonlocal_out = NonLocalBlock(nf, cfg.nonlocal_inner, cfg.nonlocal_scale) if cfg.nonlocal_blocks else None
        self.pyramid = FeaturePyramid(nf)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = lrelu(self.conv_first(x))
        if self.nonlocal_in is not None:
            x = self.nonlocal_in(x)
        x = self.trunk(x)
        if self.nonlocal_out is not None:
            x = self.nonlocal_out(x)
        return self.pyramid(x)


class MEGAN(nn.Module):
    """Space-time video super-resolution: n_in frames -> 2*n_in - 1 frames at 4x resolution.

    Sub-modules, in order: ``features`` (shared per-frame feature extraction
    with non-local blocks and a 3-level pyramid), ``interpolation`` (PCD
    alignment synthesising the feature of each in-between frame),
    ``convlstm`` (bidirectional deformable ConvLSTM), ``lmga`` (long-range
    memory graph aggregation), ``pfrdbs`` (progressive fusion) and
    ``reconstruction`` (residual trunk + PixelShuffle x4), docs/DESIGN.md section 3.

    Args:
        config: a :class:`MEGANConfig`, or None; keyword arguments override its fields.

    Shape:
        (b, n_in, 3, H, W) -> (b, 2*n_in - 1, 3, 4H, 4W) for any H, W (padded
        to a multiple of 4 inside, cropped back).  Output frame 2i re-makes
        input frame i; frame 2i+1 lies between inputs i and i+1.  With k
        times: (b, n_in + (n_in - 1) * k, 3, 4H, 4W) in time order (input
        frame, its k in-between frames, next input frame, ...).

    The same class builds Zooming Slow-Mo, MEGAN's backbone:
    ``MEGAN(MEGANConfig.zooming_slowmo())`` (no non-local blocks, LMGA or
    progressive fusion; any number of input frames >= 2), which
    :func:`megan_fast.models.load_model` fills with the official weights; and
    TMNet, ``MEGAN(MEGANConfig.tmnet())``, Zooming Slow-Mo with temporal
    modulation: ``model(x, times=[t1, ..., tk])`` makes k in-between frames
    per pair of inputs, at those times in (0, 1).

    ``MEGANConfig(global_skip=True)`` (not in the paper; off by default) adds
    the evaluation baseline (:func:`megan_fast.models.baseline.bicubic_blend`:
    bicubic x4, in-between frames blended) to the output and zero-initialises
    the last convolution, so the network learns a residual over it: useful for
    short training runs such as the demo checkpoint's.
    """

    def __init__(self, config: MEGANConfig | dict | None = None, **overrides: Any) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = MEGANConfig.from_dict(config)
        if overrides:
            config = MEGANConfig.from_dict({**dataclasses.asdict(config or MEGANConfig()), **overrides})
        cfg = config or MEGANConfig()
        self.config = cfg
        nf, t_out = cfg.nf, cfg.num_output_frames
        self.features = FeatureExtractor(cfg)
        self.interpolation = PCDAlign(nf, cfg.deformable_groups, cfg.time_modulation)
        self.comparison = NeighbourComparison(nf, cfg.deformable_groups) if cfg.neighbour_comparison else None
        self.convlstm = DeformableConvLSTM(nf, cfg.deformable_groups)
        self.lmga = (LMGA(nf, cfg.tau, cfg.graph_layers, cfg.graph_hidden, cfg.graph_slope, seed=cfg.memory_seed)
                     if cfg.lmga else None)
        self.pfrdbs = nn.ModuleList(PFRDB(nf, t_out) for _ in range(cfg.num_pfrdb))
        self.reconstruction = Reconstruction(nf, cfg.back_blocks)
        if cfg.global_skip:
            # The network then learns a residual over the baseline: starting from zero
            # output makes the untrained model exactly "bicubic x4 + frame blending".
            nn.init.zeros_(self.reconstruction.conv_last.weight)
            nn.init.zeros_(self.reconstruction.conv_last.bias)

    # ------------------------------------------------------------------ config

    def config_dict(self) -> dict:
        """The config as a plain dict: ``MEGAN(model.config_dict())`` builds the same architecture."""
        return dataclasses.asdict(self.config)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, memory_indices: list[int] | Tensor | None = None,
                times: list[float] | tuple[float, ...] | Tensor | None = None) -> Tensor:
        """x (b, n_in, 3, H, W) -> frames at 4x (see the class docstring).

        Args:
            memory_indices: LMGA's memory frames (training; see :class:`megan_fast.nn.LMGA`).
            times: the in-between frames to make per pair of inputs: increasing
                floats in (0, 1), or a (b, k) tensor of them (a row per
                sample).  Default [0.5].  Only time-modulated models
                (``MEGANConfig.tmnet()``) take other times than [0.5].
        """
        cfg = self.config
        check_input(x, cfg, self.conv_dtype())
        b, n, _, h, w = x.shape
        k, t_values = check_times(times, b, cfg.time_modulation, x)
        pad_h, pad_w = (-h) % 4, (-w) % 4
        frames = x.reshape(b * n, 3, h, w)
        if pad_h or pad_w or torch.compiler.is_exporting():  # an exported graph takes any size: it always pads
            frames = F.pad(frames, (0, pad_w, 0, pad_h), mode="replicate" if cfg.pad_mode == "replicate" else "constant")
        hp, wp = h + pad_h, w + pad_w
        nf = cfg.nf

        l1, l2, l3 = self.features(frames)
        levels = [lvl.reshape(b, n, nf, *lvl.shape[-2:]) for lvl in (l1, l2, l3)]

        # In-between features for all neighbouring pairs (and all k times) at once: batch (b, n - 1, k).
        def pairs(lvl: Tensor, sl: slice) -> Tensor:
            part = lvl[:, sl]
            if k > 1:
                part = part.unsqueeze(2).expand(b, n - 1, k, *part.shape[2:])
            return part.reshape(b * (n - 1) * k, *lvl.shape[2:])

        first = tuple(pairs(lvl, slice(None, -1)) for lvl in levels)
        second = tuple(pairs(lvl, slice(1, None)) for lvl in levels)
        t_batch = None
        if t_values is not None:
            t_batch = t_values.reshape(b, 1, k).expand(b, n - 1, k).reshape(b * (n - 1) * k, 1, 1, 1)
        between = self.interpolation(first, second, t_batch).reshape(b, n - 1, k, nf, hp, wp)
        # Sequence F1, I1_1 .. I1_k, F2, ..., Fn.
        t = output_frames(n, k)
        seq = torch.cat((levels[0][:, :-1].unsqueeze(2), between), 2).reshape(b, t - 1, nf, hp, wp)
        seq = torch.cat((seq, levels[0][:, -1:]), 1)

        lstm_in = seq if self.comparison is None else self.comparison(seq)
        feats = self.convlstm(lstm_in)
        if self.lmga is not None:
            feats = self.lmga(feats, memory_indices)
        for block in self.pfrdbs:
            feats = block(feats)
        skip = seq.reshape(b * t, nf, hp, wp) if cfg.reconstruction_skip else None
        out = self.reconstruction(feats.reshape(b * t, nf, hp, wp), skip)
        out = out.reshape(b, t, 3, 4 * hp, 4 * wp)[..., : 4 * h, : 4 * w]
        if cfg.global_skip:
            out = out + bicubic_blend(x, t_values)
        return out

    def conv_dtype(self) -> torch.dtype:
        """The dtype of the model's weights, which an input must have (outside autocast)."""
        return self.features.conv_first.weight.dtype

    # ------------------------------------------------------------------ weights I/O

    def save_pretrained(self, directory: str | os.PathLike, written_by: str | None = None) -> None:
        """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        ``written_by``: a mark put in both files (the commands pass theirs,
        docs/DESIGN.md section 5); :func:`megan_fast.models.saving.save_pretrained`.
        """
        from megan_fast.models.saving import save_pretrained

        save_pretrained(self, directory, written_by)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "MEGAN":
        """Builds the model from ``config.json`` and loads ``model.safetensors`` from ``directory``
        (:func:`megan_fast.models.loading.load_folder`).

        Raises:
            MissingCheckpointError: no such folder or file (also a FileNotFoundError).
            CheckpointError: an unreadable, corrupt or mistyped file, weights that do not fit the config, or a
                model larger than this machine's memory (one line, naming the file).
        """
        from megan_fast.models.loading import load_folder

        return load_folder(directory, map_location, cls)
