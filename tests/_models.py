"""The tiny models every test file builds: one home for their sizes (seconds on a 2-core CPU, every part kept)."""

from __future__ import annotations

import torch

# Widths and block counts of a model small enough to run anywhere in a test, with every part of the network.
TINY_SIZES = dict(nf=8, deformable_groups=2, front_blocks=1, back_blocks=1)
# MEGAN at those sizes: one progressive fusion block, small non-local and graph layers, two memory frames.
TINY_MEGAN = dict(TINY_SIZES, num_pfrdb=1, nonlocal_inner=4, graph_hidden=4, tau=2)


def tiny_model(name: str = "megan", **overrides):
    """A tiny random member of the family (``megan``, ``zooming_slowmo``, ``tmnet``), seeded, in training mode."""
    from megan_fast.models import create_model

    torch.manual_seed(0)
    return create_model(name, **{**(TINY_MEGAN if name == "megan" else TINY_SIZES), **overrides})


def save_tiny_model(path, name: str = "megan", **overrides) -> str:
    """:func:`tiny_model` saved as a model folder at ``path``; ``global_skip=True`` makes its output exactly
    bicubic + frame blending."""
    tiny_model(name, **overrides).save_pretrained(path)
    return str(path)
