"""Triton kernels of the modulated deformable convolution (DCNv2).

Matches ``torchvision.ops.deform_conv2d`` (forward and every gradient but the
bias one).  Layout of the file (as in Liger-Kernel's ops files): private
``@triton.jit`` helpers and kernels first, then the host launchers
:func:`deform_conv2d_forward` and :func:`deform_conv2d_backward`.  Nothing is
registered with ``torch.library`` here; ``megan_fast.ops.deform_conv`` wires
the launchers into the op.

Notation
--------
    input (B, C, H, W), weight (Co, Cg, KH, KW) with G = C / Cg groups,
    Cog = Co / G output channels per group, K = KH * KW taps,
    offset (B, 2 * OG * K, Ho, Wo), mask (B, OG * K, Ho, Wo), Cpo = C / OG
    channels per offset group, P = B * Ho * Wo output pixels.

The convolution is an implicit GEMM per group g:

    out[p, g*Cog + n] = bias + sum_r cols[p, r] * Wt[g, r, n]

over the reduction index r = k * Cg + c (tap major, channel minor), where
cols[p, r] = mask[p, og(c), k] * bilinear(input[b, g*Cg + c], y, x) is the
deformed "im2col" column and Wt[g, r, n] = weight[g*Cog + n, c, k] (the
weight is permuted once on the host so that a [BLOCK_K, BLOCK_N] tile is a
coalesced load).  The columns are never written to global memory: every
kernel gathers its [BLOCK_P, BLOCK_K] tile of samples straight into
registers and feeds it to ``tl.dot``.

Sampling in tiles of chunks
---------------------------
Every element of a [BLOCK_P, BLOCK_K] column tile needs a sample point
(y, x), which depends on (pixel, tap, offset group) only, not on the channel.
The tile's BLOCK_K reduction indices are therefore split into NCHUNK chunks
of CHUNK consecutive channels that share one tap and one offset group
(CHUNK = the largest power of two dividing both Cg and Cpo, at most
BLOCK_K; CHUNK = 1 for odd channel counts).  The sample point, the bilinear
weights, the corner validity and the mask are computed once per
[BLOCK_P, NCHUNK] chunk (kept as [BLOCK_P, NCHUNK, 1] tensors) and broadcast
over the [BLOCK_P, NCHUNK, CHUNK] element tile; only the four corner loads
(and, backward, atomics) are per element.  A single reshape to
[BLOCK_P, BLOCK_K] feeds the tile to ``tl.dot``.

The input is gathered in channels-last layout (B, H, W, C): the CHUNK
channels of one corner are then contiguous in memory, so the gathers (and
the grad_input atomics) are coalesced whatever the offsets are.  The host
makes that copy (free when the input already is channels_last).

Conventions (checked against torchvision's CPU kernels)
-------------------------------------------------------
* Sample point y = oy*stride_h - pad_h + i*dil_h + dy, x likewise, with
  dy = offset[b, 2*(og*K + k)], dx = offset[b, 2*(og*K + k) + 1], k = i*KW + j.
* Forward / grad_mask / grad_weight use torchvision's bilinear_interpolate:
  0 when y <= -1 or y >= H or x <= -1 or x >= W, else the floor-based four
  corners, each used only when inside the image.
* grad_input: mask * grad_col * (corner weight) into the four corners (zero
  for points with y <= -1 etc. anyway).
* grad_offset uses the floor-based corners with NO early-out (torchvision's
  get_coordinate_weight): y = -1 exactly has a non-zero dy gradient.
      d/dy = lx * (v11 - v01) + (1 - lx) * (v10 - v00)
      d/dx = ly * (v11 - v10) + (1 - ly) * (v01 - v00)
* A point whose four corners are all outside the image (y < -1, y >= H,
  x < -1, x >= W) contributes nothing anywhere.  NaN and infinite offsets are
  treated as such points: they are replaced by a sentinel (-4, -4) before the
  float -> int conversion, so no load or atomic can go out of bounds and
  their gradients are 0 (torchvision gives NaN or reads out of bounds there).

Backward paths
--------------
* Up to 128 output channels per group (MEGAN: 64), one sampling pass
  (:func:`_dcn_bwd_one_pass_kernel`): a program holds its weight slice for all
  of the group's output channels, so every gradient comes from one gather.
* Wider groups (more output channels per group than one register tile holds):
  two passes, :func:`_dcn_bwd_wide_inputs_kernel` (grad_cols reduced over
  blocks of output channels, then the input, offset and mask gradients by
  atomics) and :func:`_dcn_bwd_wide_weight_kernel` (the columns sampled again,
  the weight gradient in blocks of output channels).

Precision (the table in megan_fast/triton/_utils.py, one for the four ops):
accumulation in fp32 (fp64 for fp64 inputs, interpreter only); fp32 tiles
are exact IEEE products unless the user allowed TF32, fp64 tiles always;
fp16/bf16 tiles are fed to ``tl.dot`` in their own type with fp32
accumulation.  Atomic accumulation buffers are fp32 (fp64 for fp64) and cast
at the end.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from megan_fast.triton._utils import dot, expect, launch, num_sms, numel_needs_int64, precision, runnable

__all__ = ["deform_conv2d_forward", "deform_conv2d_backward"]


# =============================================================================
# JIT helpers
# =============================================================================


@triton.jit
def _decode_pixels(pid_p, P, HoWo, Wo, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """Output pixels p = (b, oy, ox) of a BLOCK_P tile; p runs over B * Ho * Wo."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    b = p // HoWo
    pix = p - b * HoWo
    oy = pix // Wo
    ox = pix - oy * Wo
    if INT64:
        # Every batch-strided address is derived from b: widening b widens them all.
        b = b.to(tl.int64)
    return p_ok, b, pix, oy, ox


@triton.jit
def _decode_chunks(r0, g, KC, Cg, Cpo, NCHUNK: tl.constexpr, CHUNK: tl.constexpr):
    """Chunks of the reduction range [r0, r0 + NCHUNK*CHUNK), r = k*Cg + c.

    CHUNK divides Cg and Cpo, so a chunk never straddles a tap or an offset
    group: tap k, offset group og and validity are per chunk.  Returns
    [NCHUNK] vectors (valid, k, og) and the [NCHUNK, CHUNK] group-local
    channel of every element.
    """
    rc = r0 + tl.arange(0, NCHUNK) * CHUNK
    c_ok = rc < KC
    k = rc // Cg
    c = rc - k * Cg
    og = (g * Cg + c) // Cpo
    ce = c[:, None] + tl.arange(0, CHUNK)[None, :]
    return c_ok, k, og, ce


@triton.jit
def _sample_points(
    off_ptr, msk_ptr, b3, pix3, oy3, ox3, live,
    k3, og3, H, W, HoWo, KW, K, OG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, CDT: tl.constexpr,
):
    """Per-chunk sample points ([BLOCK_P, NCHUNK, 1] tensors).

    Returns the fractional parts (ly, lx), the integer floor corner (y0, x0),
    the mask value m, `ok` (some corner may be inside the image: the point
    can contribute to something), `inside` (torchvision's bilinear early-out
    test: y > -1 and x > -1 too), and the offset / mask element indices.
    Dead points (not ok: outside, NaN, inf, or masked-off lanes) are moved to
    the sentinel (-4, -4), whose four corners are all outside, so the integer
    conversion is always defined and every derived address is masked off.
    """
    ki = k3 // KW
    kj = k3 - ki * KW
    ch = og3 * K + k3  # mask channel; the offset channels are 2*ch (dy) and 2*ch + 1 (dx)
    obase = (b3 * (2 * OG * K) + 2 * ch) * HoWo + pix3
    mbase = (b3 * (OG * K) + ch) * HoWo + pix3
    dy = tl.load(off_ptr + obase, mask=live, other=0.0).to(CDT)
    dx = tl.load(off_ptr + obase + HoWo, mask=live, other=0.0).to(CDT)
    if HAS_MASK:
        m = tl.load(msk_ptr + mbase, mask=live, other=0.0).to(CDT)
    else:
        m = tl.where(live, 1.0, 0.0).to(CDT)
    # The integer part is exact in floating point: same rounding as torchvision.
    y = (oy3 * stride_h - pad_h + ki * dil_h).to(CDT) + dy
    x = (ox3 * stride_w - pad_w + kj * dil_w).to(CDT) + dx
    # y in [-1, H) keeps every point that has a corner row inside; the comparisons
    # are False for NaN, so NaN (and +-inf, huge values) become dead points.
    ok = live & (y >= -1.0) & (y < H) & (x >= -1.0) & (x < W)
    y = tl.where(ok, y, -4.0)
    x = tl.where(ok, x, -4.0)
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    ly = y - y0f
    lx = x - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    inside = ok & (y > -1.0) & (x > -1.0)
    return ly, lx, y0, x0, m, ok, inside, obase, mbase


@triton.jit
def _corner_flags(y0, x0, H, W):
    """Which of the four floor corners are inside the image (sentinel -4: none)."""
    vy0 = (y0 >= 0) & (y0 < H)
    vy1 = (y0 >= -1) & (y0 + 1 < H)
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x0 >= -1) & (x0 + 1 < W)
    return vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1


@triton.jit
def _chunk_corners(
    off_ptr, msk_ptr, b, pix, oy, ox, p_ok, c_ok, k, og, ce, g,
    C, H, W, HoWo, KW, K, Cg, OG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, CDT: tl.constexpr,
):
    """A tile's per-chunk sample points ([BLOCK_P, NCHUNK, 1]) and its corner addresses ([.., .., CHUNK]).

    Returns (ly, lx, hy, hx, m, ok, inside, live, obase, mbase, f00, f01, f10, f11, a00): see
    :func:`_sample_points`; f** say which floor corners are inside the image (no early-out applied),
    a00 is the channels-last address of corner (y0, x0) (the others: + C, + W*C, + W*C + C).
    """
    b3 = b[:, None, None]
    live = p_ok[:, None, None] & c_ok[None, :, None]
    ly, lx, y0, x0, m, ok, inside, obase, mbase = _sample_points(
        off_ptr, msk_ptr, b3, pix[:, None, None], oy[:, None, None], ox[:, None, None], live,
        k[None, :, None], og[None, :, None], H, W, HoWo, KW, K, OG,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CDT,
    )
    f00, f01, f10, f11 = _corner_flags(y0, x0, H, W)
    a00 = ((b3 * H + y0) * W + x0) * C + g * Cg + ce[None, :, :]
    return ly, lx, 1.0 - ly, 1.0 - lx, m, ok, inside, live, obase, mbase, f00, f01, f10, f11, a00


@triton.jit
def _sampled_columns(
    x_ptr, off_ptr, msk_ptr,
    b, pix, oy, ox, p_ok, c_ok, k, og, ce, g,
    C, H, W, HoWo, KW, K, Cg, OG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, CDT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The [BLOCK_P, BLOCK_K] tile cols[p, r] = mask * bilinear(input, y, x) (CDT).

    Masked lanes (p >= P, r >= K*Cg) are 0.  x_ptr is the channels-last input.
    """
    ly, lx, hy, hx, m, ok, inside, live, obase, mbase, f00, f01, f10, f11, a00 = _chunk_corners(
        off_ptr, msk_ptr, b, pix, oy, ox, p_ok, c_ok, k, og, ce, g, C, H, W, HoWo, KW, K, Cg, OG,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CDT,
    )
    f00 = f00 & inside
    f01 = f01 & inside
    f10 = f10 & inside
    f11 = f11 & inside
    # Per-chunk weights with the mask folded in: 4 multiply-adds per element.
    w00 = m * hy * hx
    w01 = m * hy * lx
    w10 = m * ly * hx
    w11 = m * ly * lx
    v = w00 * tl.load(x_ptr + a00, mask=f00, other=0.0).to(CDT)
    v += w01 * tl.load(x_ptr + a00 + C, mask=f01, other=0.0).to(CDT)
    v += w10 * tl.load(x_ptr + a00 + W * C, mask=f10, other=0.0).to(CDT)
    v += w11 * tl.load(x_ptr + a00 + (W * C + C), mask=f11, other=0.0).to(CDT)
    return tl.reshape(v, (BLOCK_P, BLOCK_K))


# =============================================================================
# Kernels
# =============================================================================


@triton.jit
def _dcn_fwd_kernel(
    x_ptr, off_ptr, msk_ptr, w_ptr, bias_ptr, out_ptr,
    P, C, H, W, Ho, Wo, Co, Cg, Cog, KC, Cpo, OG, KW, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """out tile [BLOCK_P, BLOCK_N] of group g = sum over r tiles of cols @ Wt.

    grid = (cdiv(P, BLOCK_P), cdiv(Cog, BLOCK_N), G).
    """
    NCHUNK: tl.constexpr = BLOCK_K // CHUNK
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    HoWo = Ho * Wo
    p_ok, b, pix, oy, ox = _decode_pixels(pid_p, P, HoWo, Wo, BLOCK_P, INT64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Cog
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=CDT)
    for r0 in range(0, KC, BLOCK_K):
        c_ok, k, og, ce = _decode_chunks(r0, g, KC, Cg, Cpo, NCHUNK, CHUNK)
        cols = _sampled_columns(
            x_ptr, off_ptr, msk_ptr, b, pix, oy, ox, p_ok, c_ok, k, og, ce, g,
            C, H, W, HoWo, KW, K, Cg, OG,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            HAS_MASK, CDT, BLOCK_P, BLOCK_K,
        )
        r = r0 + tl.arange(0, BLOCK_K)
        wt = tl.load(
            w_ptr + (g * KC + r)[:, None] * Cog + n[None, :],
            mask=(r < KC)[:, None] & n_ok[None, :], other=0.0,
        )
        # fp16/bf16: the low-precision tile goes to the tensor cores, fp32 accumulation.
        acc = dot(cols.to(wt.dtype), wt, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * Cog + n, mask=n_ok, other=0.0).to(CDT)[None, :]
    out_off = (b[:, None] * Co + g * Cog + n[None, :]) * HoWo + pix[:, None]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _dcn_bwd_wide_inputs_kernel(
    gout_ptr, x_ptr, off_ptr, msk_ptr, w_ptr,
    gin_ptr, goff_ptr, gmsk_ptr,
    P, C, H, W, Ho, Wo, Co, Cg, Cog, KC, Cpo, OG, KW, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr, INT64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """grad_input, grad_offset and grad_mask from a [BLOCK_P, BLOCK_K] tile of grad_cols.

    grid = (cdiv(P, BLOCK_P), cdiv(K*Cg, BLOCK_K), G).

    grad_cols[p, r] = sum_n gout[p, g*Cog + n] * Wt[g, r, n]   (tl.dot over Cog)
    then, with gm = mask * grad_cols:
      grad_input[b, y_c, x_c, g*Cg + c] += gm * corner_weight        (4 atomics / element)
      grad_offset[b, 2*ch (+1), pix]     += sum_c gm * d bilinear / dy (dx)
      grad_mask[b, ch, pix]              += sum_c grad_cols * bilinear
    The channel sums are first reduced in registers over each chunk (all the
    chunk's channels share the point), then one atomic per chunk adds the
    partial sum (other chunks / programs hold the offset group's other channels).
    """
    NCHUNK: tl.constexpr = BLOCK_K // CHUNK
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    HoWo = Ho * Wo
    p_ok, b, pix, oy, ox = _decode_pixels(pid_p, P, HoWo, Wo, BLOCK_P, INT64)
    r0 = pid_k * BLOCK_K
    r = r0 + tl.arange(0, BLOCK_K)
    r_ok = r < KC

    # ---- grad_cols = gout @ Wt^T  (reduction over this group's output channels)
    gcol = tl.zeros((BLOCK_P, BLOCK_K), dtype=CDT)
    for n0 in range(0, Cog, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < Cog
        go = tl.load(
            gout_ptr + (b[:, None] * Co + g * Cog + n[None, :]) * HoWo + pix[:, None],
            mask=p_ok[:, None] & n_ok[None, :], other=0.0,
        )
        wt = tl.load(
            w_ptr + (g * KC + r[None, :]) * Cog + n[:, None],
            mask=r_ok[None, :] & n_ok[:, None], other=0.0,
        )
        gcol = dot(go, wt, gcol, IEEE)
    gcol3 = tl.reshape(gcol, (BLOCK_P, NCHUNK, CHUNK))

    # ---- sample points of the tile (per chunk)
    c_ok, k, og, ce = _decode_chunks(r0, g, KC, Cg, Cpo, NCHUNK, CHUNK)
    ly, lx, hy, hx, m, ok, inside, live, obase, mbase, f00, f01, f10, f11, a00 = _chunk_corners(
        off_ptr, msk_ptr, b, pix, oy, ox, p_ok, c_ok, k, og, ce, g, C, H, W, HoWo, KW, K, Cg, OG,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CDT,
    )
    a01 = a00 + C
    a10 = a00 + W * C
    a11 = a10 + C

    # ---- grad_input: scatter (only points inside torchvision's (-1, H) x (-1, W)
    # window get weight; a point at exactly -1 has weight 0 on its one inside corner).
    gm = gcol3 * m
    tl.atomic_add(gin_ptr + a00, gm * (hy * hx), mask=f00 & inside, sem="relaxed")
    tl.atomic_add(gin_ptr + a01, gm * (hy * lx), mask=f01 & inside, sem="relaxed")
    tl.atomic_add(gin_ptr + a10, gm * (ly * hx), mask=f10 & inside, sem="relaxed")
    tl.atomic_add(gin_ptr + a11, gm * (ly * lx), mask=f11 & inside, sem="relaxed")

    # ---- grad_offset / grad_mask: corner values without the early-out
    v00 = tl.load(x_ptr + a00, mask=f00, other=0.0).to(CDT)
    v01 = tl.load(x_ptr + a01, mask=f01, other=0.0).to(CDT)
    v10 = tl.load(x_ptr + a10, mask=f10, other=0.0).to(CDT)
    v11 = tl.load(x_ptr + a11, mask=f11, other=0.0).to(CDT)
    d_dy = lx * (v11 - v01) + hx * (v10 - v00)
    d_dx = ly * (v11 - v10) + hy * (v01 - v00)
    g_dy = tl.sum(gm * d_dy, axis=2, keep_dims=True)
    g_dx = tl.sum(gm * d_dx, axis=2, keep_dims=True)
    tl.atomic_add(goff_ptr + obase, g_dy, mask=ok, sem="relaxed")
    tl.atomic_add(goff_ptr + obase + HoWo, g_dx, mask=ok, sem="relaxed")
    if HAS_MASK:
        val = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
        g_m = tl.sum(gcol3 * val, axis=2, keep_dims=True)
        tl.atomic_add(gmsk_ptr + mbase, g_m, mask=inside, sem="relaxed")


@triton.jit
def _dcn_bwd_wide_weight_kernel(
    gout_ptr, x_ptr, off_ptr, msk_ptr, part_ptr,
    P, C, H, W, Ho, Wo, Co, Cg, Cog, KC, Cpo, OG, KW, K, G, TILES_PER_SPLIT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr, INT64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """partial[s, g, r, n] = sum over the pixel tiles of split s of cols^T @ gout.

    grid = (cdiv(K*Cg, BLOCK_K), cdiv(Cog, BLOCK_N), G * SPLIT).  The pixel
    axis is split so that small weights still fill the GPU; the host sums the
    SPLIT partial results (deterministic, no atomics).  The columns are
    re-sampled here rather than stored by the forward.
    """
    NCHUNK: tl.constexpr = BLOCK_K // CHUNK
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_gs = tl.program_id(2)
    g = pid_gs % G
    s = pid_gs // G
    HoWo = Ho * Wo
    r0 = pid_k * BLOCK_K
    r = r0 + tl.arange(0, BLOCK_K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Cog
    c_ok, k, og, ce = _decode_chunks(r0, g, KC, Cg, Cpo, NCHUNK, CHUNK)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=CDT)
    t_start = s * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, tl.cdiv(P, BLOCK_P))
    for t in range(t_start, t_end):
        p_ok, b, pix, oy, ox = _decode_pixels(t, P, HoWo, Wo, BLOCK_P, INT64)
        cols = _sampled_columns(
            x_ptr, off_ptr, msk_ptr, b, pix, oy, ox, p_ok, c_ok, k, og, ce, g,
            C, H, W, HoWo, KW, K, Cg, OG,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            HAS_MASK, CDT, BLOCK_P, BLOCK_K,
        )
        go = tl.load(
            gout_ptr + (b[:, None] * Co + g * Cog + n[None, :]) * HoWo + pix[:, None],
            mask=p_ok[:, None] & n_ok[None, :], other=0.0,
        )
        acc = dot(tl.trans(cols.to(go.dtype)), go, acc, IEEE)
    part_off = ((s * G + g) * KC + r[:, None]) * Cog + n[None, :]
    tl.store(part_ptr + part_off, acc, mask=(r < KC)[:, None] & n_ok[None, :])


@triton.jit
def _dcn_bwd_one_pass_kernel(
    gout_ptr, x_ptr, off_ptr, msk_ptr, w_ptr,
    gin_ptr, goff_ptr, gmsk_ptr, part_ptr,
    P, C, H, W, Ho, Wo, Co, Cg, Cog, KC, Cpo, OG, KW, K, PIX_PER_SPLIT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr, INT64: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """Every gradient from one sampling pass: grid = (SPLIT, cdiv(K*Cg, BLOCK_K), G).

    A program owns reduction tile r = [r0, r0 + BLOCK_K) of group g, keeps its
    weight slice Wt[g, r, :] ([BLOCK_K, BLOCK_N], BLOCK_N >= Cog) and its
    weight-gradient tile in registers, and walks over the pixel tiles of
    split s (PIX_PER_SPLIT pixels, a multiple of BLOCK_P).  Per pixel tile it
    loads grad_output once, forms grad_cols = gout @ Wt^T, gathers the four
    bilinear corners once and derives from them
      grad_input  (4 fp32 atomics per element into the channels-last buffer),
      grad_offset / grad_mask (channel sums reduced in registers per chunk;
                   DIRECT: the chunk is the whole offset group, so the sum is
                   complete and is stored, no atomics, no zero-filled buffer),
      grad_weight (cols^T @ gout accumulated in registers, one partial per
                   split, summed on the host: deterministic).
    """
    NCHUNK: tl.constexpr = BLOCK_K // CHUNK
    s = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    HoWo = Ho * Wo
    r0 = pid_k * BLOCK_K
    r = r0 + tl.arange(0, BLOCK_K)
    r_ok = r < KC
    n = tl.arange(0, BLOCK_N)
    n_ok = n < Cog
    wt = tl.load(w_ptr + (g * KC + r[:, None]) * Cog + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    wtt = tl.trans(wt)
    c_ok, k, og, ce = _decode_chunks(r0, g, KC, Cg, Cpo, NCHUNK, CHUNK)
    acc_w = tl.zeros((BLOCK_K, BLOCK_N), dtype=CDT)
    tiles = PIX_PER_SPLIT // BLOCK_P
    t_start = s * tiles
    t_end = tl.minimum(t_start + tiles, tl.cdiv(P, BLOCK_P))
    for t in range(t_start, t_end):
        p_ok, b, pix, oy, ox = _decode_pixels(t, P, HoWo, Wo, BLOCK_P, INT64)
        go = tl.load(
            gout_ptr + (b[:, None] * Co + g * Cog + n[None, :]) * HoWo + pix[:, None],
            mask=p_ok[:, None] & n_ok[None, :], other=0.0,
        )
        gcol3 = tl.reshape(dot(go, wtt, None, IEEE), (BLOCK_P, NCHUNK, CHUNK))

        ly, lx, hy, hx, m, ok, inside, live, obase, mbase, f00, f01, f10, f11, a00 = _chunk_corners(
            off_ptr, msk_ptr, b, pix, oy, ox, p_ok, c_ok, k, og, ce, g, C, H, W, HoWo, KW, K, Cg, OG,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, CDT,
        )
        # The one gather: corner values without the early-out (the offset gradient needs
        # them at y = -1 exactly); the early-out is applied to the bilinear value below.
        v00 = tl.load(x_ptr + a00, mask=f00, other=0.0).to(CDT)
        v01 = tl.load(x_ptr + a00 + C, mask=f01, other=0.0).to(CDT)
        v10 = tl.load(x_ptr + a00 + W * C, mask=f10, other=0.0).to(CDT)
        v11 = tl.load(x_ptr + a00 + (W * C + C), mask=f11, other=0.0).to(CDT)

        # ---- grad_input
        gm = gcol3 * m
        tl.atomic_add(gin_ptr + a00, gm * (hy * hx), mask=f00 & inside, sem="relaxed")
        tl.atomic_add(gin_ptr + a00 + C, gm * (hy * lx), mask=f01 & inside, sem="relaxed")
        tl.atomic_add(gin_ptr + a00 + W * C, gm * (ly * hx), mask=f10 & inside, sem="relaxed")
        tl.atomic_add(gin_ptr + a00 + (W * C + C), gm * (ly * lx), mask=f11 & inside, sem="relaxed")

        # ---- grad_offset / grad_mask
        g_dy = tl.sum(gm * (lx * (v11 - v01) + hx * (v10 - v00)), axis=2, keep_dims=True)
        g_dx = tl.sum(gm * (ly * (v11 - v10) + hy * (v01 - v00)), axis=2, keep_dims=True)
        val = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
        if DIRECT:
            # Dead points (outside, NaN) get an exact 0, whatever grad_output holds.
            tl.store(goff_ptr + obase, tl.where(ok, g_dy, 0.0).to(goff_ptr.dtype.element_ty), mask=live)
            tl.store(goff_ptr + obase + HoWo, tl.where(ok, g_dx, 0.0).to(goff_ptr.dtype.element_ty), mask=live)
        else:
            tl.atomic_add(goff_ptr + obase, g_dy, mask=ok, sem="relaxed")
            tl.atomic_add(goff_ptr + obase + HoWo, g_dx, mask=ok, sem="relaxed")
        if HAS_MASK:
            g_m = tl.sum(gcol3 * val, axis=2, keep_dims=True)
            if DIRECT:
                tl.store(gmsk_ptr + mbase, tl.where(inside, g_m, 0.0).to(gmsk_ptr.dtype.element_ty), mask=live)
            else:
                tl.atomic_add(gmsk_ptr + mbase, g_m, mask=inside, sem="relaxed")

        # ---- grad_weight: the forward's column tile, rebuilt from the same corners
        cols = tl.reshape(tl.where(inside, m * val, 0.0), (BLOCK_P, BLOCK_K))
        acc_w = dot(tl.trans(cols.to(go.dtype)), go, acc_w, IEEE)
    part_off = ((s * tl.num_programs(2) + g) * KC + r[:, None]) * Cog + n[None, :]
    tl.store(part_ptr + part_off, acc_w, mask=r_ok[:, None] & n_ok[None, :])


# ---- autotuned entry points (CUDA)
#
# CHUNK follows from the geometry and BLOCK_K, so it is a heuristic under the
# autotuner: every config gets its own.  DIRECT is decided on the host (it
# fixes how the gradient buffers are allocated) and holds in every config.  The config lists hold the
# hand-picked settings measured on an H100 (docs/PERFORMANCE.md) plus neighbours; all compile for sm_90 without register
# spills (python -m megan_fast.triton.sm90_compile).  Autotuning benchmarks each config on the
# first call of a new problem size: warm up outside timed and captured regions
# (torch.compile's reduce-overhead does, with its eager warm-up runs).


def _chunk_of(args: dict) -> int:
    return min(_chunk_base(args["Cg"], args["Cpo"]), args["BLOCK_K"])


_CHUNK_HEURISTICS = {"CHUNK": _chunk_of}
_TUNE_KEY = ["P", "C", "H", "W", "Co", "Cg", "KC", "Cpo", "HAS_MASK", "IEEE"]


def _configs(tiles) -> list:
    """triton.Config for every (BLOCK_P, BLOCK_K, num_warps, num_stages)."""
    return [triton.Config(dict(BLOCK_P=bp, BLOCK_K=bk), num_warps=nw, num_stages=ns) for bp, bk, nw, ns in tiles]


_dcn_fwd_chunked = triton.heuristics(_CHUNK_HEURISTICS)(_dcn_fwd_kernel)
_dcn_fwd_tuned = triton.autotune(_configs([
    (64, 32, 8, 2), (64, 32, 8, 3), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (128, 16, 8, 3),
]), key=_TUNE_KEY)(_dcn_fwd_chunked)
_dcn_bwd_one_pass = triton.heuristics(_CHUNK_HEURISTICS)(_dcn_bwd_one_pass_kernel)
_dcn_bwd_one_pass_tuned = triton.autotune(_configs([
    (32, 32, 8, 1), (64, 16, 8, 1), (64, 16, 8, 2), (32, 16, 4, 2), (64, 32, 16, 1),
]), key=_TUNE_KEY, reset_to_zero=["gin_ptr", "goff_ptr", "gmsk_ptr"])(_dcn_bwd_one_pass)




def _tuned(device: torch.device) -> bool:
    """Whether the launchers run the autotuned entry points: on CUDA (the interpreter takes fixed blocks)."""
    return device.type == "cuda"


# Every split of the one-pass backward covers a multiple of the largest BLOCK_P above.
_SPLIT_PIXELS = 128
# Largest output-channel count per group the one-pass backward holds in one tile; wider groups take the
# two-pass path (_backward_wide_groups).
_ONE_PASS_MAX_COG = 128


# =============================================================================
# Host side
# =============================================================================



def _pow2_factor(n: int) -> int:
    """Largest power of two dividing n (n > 0)."""
    return n & -n


def _chunk_base(cg: int, cpo: int) -> int:
    """Channels that share one sample point at most: the largest power of two dividing Cg and Cpo (before the
    BLOCK_K cap)."""
    return _pow2_factor(math.gcd(cg, cpo))


def _geometry(input: Tensor, offset: Tensor, weight: Tensor, stride, padding, dilation) -> dict:
    b, c, h, w = input.shape
    co, cg, kh, kw = weight.shape
    k = kh * kw
    expect(cg > 0 and c % cg == 0 and offset.shape[1] > 0 and offset.shape[1] % (2 * k) == 0,
           f"deform_conv2d: inconsistent channels (input {c}, weight {tuple(weight.shape)}, offset {offset.shape[1]})")
    groups = c // cg
    og = offset.shape[1] // (2 * k)
    expect(co % groups == 0 and c % og == 0, f"deform_conv2d: groups {groups} / offset groups {og} do not divide")
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    expect(tuple(offset.shape) == (b, 2 * og * k, ho, wo),
           f"deform_conv2d: offset shape {tuple(offset.shape)}, expected {(b, 2 * og * k, ho, wo)}")
    cpo = c // og
    return dict(
        B=b, C=c, H=h, W=w, Co=co, Cg=cg, G=groups, Cog=co // groups, KH=kh, KW=kw, K=k, KC=k * cg,
        OG=og, Cpo=cpo, Ho=ho, Wo=wo, P=b * ho * wo,
        conv=(sh, sw, ph, pw, dh, dw),
        # A chunk of channels shares one tap and one offset group (see the module docstring).
        chunk_base=_chunk_base(cg, cpo),
    )


def _next_pow2_clamped(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# The interpreter's blocks (CPU tensors under TRITON_INTERPRET=1): small, so that numpy temporaries stay
# small and the tiny test problems span several tiles and tails.  On CUDA the forward and the one-pass
# backward are autotuned (lists above); the launchers refuse float64 on a GPU (triton/_utils.runnable).
_INTERPRETER_FWD = dict(BLOCK_P=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
_INTERPRETER_ONE_PASS = dict(BLOCK_P=16, BLOCK_K=16, num_warps=4, num_stages=1)


def _wide_inputs_config(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_P=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    # The scatter half of this kernel keeps ~12 [BLOCK_P, BLOCK_K] tensors live
    # (addresses, corner values, grad_cols): 8 warps keep that at ~8 elements a thread.
    return dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2)


def _wide_weight_config(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_P=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, max_split=2)
    return dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2, max_split=None)


def _chunk(geo: dict, block_k: int) -> int:
    return min(geo["chunk_base"], block_k)


def _conv_args(geo: dict) -> tuple:
    return (geo["P"], geo["C"], geo["H"], geo["W"], geo["Ho"], geo["Wo"], geo["Co"], geo["Cg"], geo["Cog"],
            geo["KC"], geo["Cpo"], geo["OG"], geo["KW"], geo["K"])


def _permuted_weight(weight: Tensor, geo: dict) -> Tensor:
    """Wt[g, r = k*Cg + c, n] = weight[g*Cog + n, c, k], contiguous (G, K*Cg, Cog)."""
    return weight.reshape(geo["G"], geo["Cog"], geo["Cg"], geo["K"]).permute(0, 3, 2, 1).contiguous()


def _channels_last(input: Tensor) -> Tensor:
    """(B, H, W, C) contiguous; no copy when the input already is channels_last."""
    return input.permute(0, 2, 3, 1).contiguous()


def _like(result: Tensor, like: Tensor) -> Tensor:
    """result in like's dtype and with the strides torch.empty_like(like) would have."""
    out = torch.empty_like(like)
    if out.stride() == result.stride() and out.dtype == result.dtype:
        return result
    return out.copy_(result)


def deform_conv2d_forward(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride,
    padding,
    dilation,
) -> Tensor:
    """Modulated deformable convolution forward (torchvision.ops.deform_conv2d semantics).

    input (B, C, H, W), offset (B, 2*OG*KH*KW, Ho, Wo), weight (Co, C/G, KH, KW),
    bias (Co,) or None, mask (B, OG*KH*KW, Ho, Wo) or None (= ones);
    stride / padding / dilation: pairs of ints.  Returns (B, Co, Ho, Wo) in the
    input dtype.
    """
    runnable(input, "deform_conv2d")
    geo = _geometry(input, offset, weight, stride, padding, dilation)
    out = input.new_empty(geo["B"], geo["Co"], geo["Ho"], geo["Wo"])
    if out.numel() == 0:
        return out
    device, dtype = input.device, input.dtype
    x = _channels_last(input)
    offset = offset.contiguous()
    mask_c = mask.contiguous() if mask is not None else None
    bias_c = bias.contiguous() if bias is not None else None
    wt = _permuted_weight(weight, geo)
    args = (x, offset, mask_c if mask_c is not None else offset, wt, bias_c if bias_c is not None else wt, out,
            *_conv_args(geo), *geo["conv"])
    prec = precision(dtype, device)
    meta = dict(
        HAS_MASK=mask_c is not None, HAS_BIAS=bias_c is not None,
        IEEE=prec.ieee, CDT=prec.compute,
        INT64=numel_needs_int64(x, offset, out),
    )
    if _tuned(device):
        # Cover all of a group's output channels (up to 128) with one N tile so the
        # (expensive) sampling of a column tile is done once per pixel tile.
        bn = _next_pow2_clamped(geo["Cog"], 16, 128)
        grid = lambda cfg: (triton.cdiv(geo["P"], cfg["BLOCK_P"]), triton.cdiv(geo["Cog"], bn), geo["G"])  # noqa: E731
        launch(_dcn_fwd_tuned, grid, args, dict(meta, BLOCK_N=bn), "deform_conv2d", dtype, device)
        return out
    cfg = _INTERPRETER_FWD
    grid = (triton.cdiv(geo["P"], cfg["BLOCK_P"]), triton.cdiv(geo["Cog"], cfg["BLOCK_N"]), geo["G"])
    meta.update(BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_dcn_fwd_chunked, grid, args, meta, "deform_conv2d", dtype, device)
    return out


def deform_conv2d_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    stride,
    padding,
    dilation,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_input, grad_offset, grad_weight, grad_mask) of :func:`deform_conv2d_forward`.

    grad_mask is ``input.new_empty(0)`` when mask is None.  No bias gradient
    (it is grad_output.sum((0, 2, 3))).
    """
    runnable(input, "deform_conv2d")
    geo = _geometry(input, offset, weight, stride, padding, dilation)
    device, dtype = input.device, input.dtype
    if geo["P"] == 0:
        return (
            torch.zeros_like(input),
            torch.zeros_like(offset),
            torch.zeros_like(weight),
            torch.zeros_like(mask) if mask is not None else input.new_empty(0),
        )
    prec = precision(dtype, device)
    gout = grad_output.contiguous()
    x = _channels_last(input)
    offset_c = offset.contiguous()
    mask_c = mask.contiguous() if mask is not None else None
    wt = _permuted_weight(weight, geo)
    int64 = numel_needs_int64(x, offset_c, gout)
    common = dict(HAS_MASK=mask_c is not None, IEEE=prec.ieee, CDT=prec.compute, INT64=int64)
    gin = torch.zeros(geo["B"], geo["H"], geo["W"], geo["C"], dtype=prec.accumulate, device=device)
    if geo["Cog"] <= _ONE_PASS_MAX_COG:
        goff, gmsk, gw = _backward_one_pass(gout, x, offset_c, mask_c, wt, gin, geo, common, device, dtype)
    else:
        goff, gmsk, gw = _backward_wide_groups(gout, x, offset_c, mask_c, wt, gin, geo, common, device, dtype)
    # (G, K, Cg, Cog) -> (G, Cog, Cg, K) -> (Co, Cg, KH, KW)
    gw = gw.view(geo["G"], geo["K"], geo["Cg"], geo["Cog"]).permute(0, 3, 2, 1)
    grad_weight = torch.empty_like(weight).copy_(gw.reshape(weight.shape))
    grad_input = torch.empty_like(input).copy_(gin.permute(0, 3, 1, 2))
    grad_offset = _like(goff, offset)
    grad_mask = _like(gmsk, mask) if mask is not None else input.new_empty(0)
    return grad_input, grad_offset, grad_weight, grad_mask


def _backward_one_pass(gout, x, offset_c, mask_c, wt, gin, geo, common, device, dtype):
    """(grad_offset, grad_mask or None, grad_weight as (G, K*Cg, Cog)) by :func:`_dcn_bwd_one_pass_kernel`;
    grad_input accumulates into gin."""
    acc_dtype = gin.dtype
    # DIRECT when a chunk is a whole offset group in every config (all have BLOCK_K >= 16): then every
    # offset / mask gradient is stored exactly once, in the offset's dtype, into an unfilled buffer.
    direct = geo["chunk_base"] == geo["Cpo"] <= 16
    make = torch.empty if direct else torch.zeros
    out_dtype = offset_c.dtype if direct else acc_dtype
    goff = make(offset_c.shape, dtype=out_dtype, device=device)
    gmsk = make(mask_c.shape, dtype=out_dtype, device=device) if mask_c is not None else goff
    tuned = _tuned(device)
    if tuned:
        # ~4 programs per SM (counted at BLOCK_K = 32), each over runs of _SPLIT_PIXELS pixels.
        runs = triton.cdiv(geo["P"], _SPLIT_PIXELS)
        split = max(1, min(runs, triton.cdiv(4 * num_sms(device), triton.cdiv(geo["KC"], 32) * geo["G"])))
        pix_per_split = triton.cdiv(runs, split) * _SPLIT_PIXELS
    else:
        # interpreter (BLOCK_P = 16): at most 4 splits (the partial buffer stays small), several tiles each
        pix_per_split = max(32, triton.cdiv(triton.cdiv(geo["P"], 4), 16) * 16)
    split = triton.cdiv(geo["P"], pix_per_split)
    part = torch.empty(split, geo["G"], geo["KC"], geo["Cog"], dtype=acc_dtype, device=device)
    args = (gout, x, offset_c, mask_c if mask_c is not None else offset_c, wt, gin, goff, gmsk, part,
            *_conv_args(geo), pix_per_split, *geo["conv"])
    meta = dict(common, DIRECT=direct, BLOCK_N=_next_pow2_clamped(geo["Cog"], 16, _ONE_PASS_MAX_COG))
    if tuned:
        grid = lambda cfg: (split, triton.cdiv(geo["KC"], cfg["BLOCK_K"]), geo["G"])  # noqa: E731
        launch(_dcn_bwd_one_pass_tuned, grid, args, meta, "deform_conv2d", dtype, device)
    else:
        meta.update(_INTERPRETER_ONE_PASS)
        launch(_dcn_bwd_one_pass, (split, triton.cdiv(geo["KC"], meta["BLOCK_K"]), geo["G"]), args, meta,
               "deform_conv2d", dtype, device)
    gw = part.sum(0) if split > 1 else part[0]
    return goff, (gmsk if mask_c is not None else None), gw


def _backward_wide_groups(gout, x, offset_c, mask_c, wt, gin, geo, common, device, dtype):
    """Groups of more than 128 output channels: :func:`_dcn_bwd_wide_inputs_kernel`, then
    :func:`_dcn_bwd_wide_weight_kernel` (which samples the columns again); neither holds a group's whole
    weight slice in registers."""
    acc_dtype = gin.dtype
    # ---- grad_input / grad_offset / grad_mask (atomics into fp32 / fp64 buffers)
    goff = torch.zeros(offset_c.shape, dtype=acc_dtype, device=device)
    gmsk = torch.zeros(mask_c.shape, dtype=acc_dtype, device=device) if mask_c is not None else goff
    cfg = _wide_inputs_config(device)
    grid = (triton.cdiv(geo["P"], cfg["BLOCK_P"]), triton.cdiv(geo["KC"], cfg["BLOCK_K"]), geo["G"])
    args = (gout, x, offset_c, mask_c if mask_c is not None else offset_c, wt, gin, goff, gmsk,
            *_conv_args(geo), *geo["conv"])
    meta = dict(common, BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                CHUNK=_chunk(geo, cfg["BLOCK_K"]), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_dcn_bwd_wide_inputs_kernel, grid, args, meta, "deform_conv2d", dtype, device)

    # ---- grad_weight: split over pixel tiles, partial sums reduced on the host
    cfg = _wide_weight_config(device)
    tiles_k = triton.cdiv(geo["KC"], cfg["BLOCK_K"])
    tiles_n = triton.cdiv(geo["Cog"], cfg["BLOCK_N"])
    tiles_p = triton.cdiv(geo["P"], cfg["BLOCK_P"])
    base_programs = tiles_k * tiles_n * geo["G"]
    if cfg["max_split"] is not None:
        split = min(cfg["max_split"], tiles_p)
    else:
        # ~4 programs per SM, each over >= 4 pixel tiles, partial buffer <= 32M elements.
        split = triton.cdiv(4 * num_sms(device), base_programs)
        split = min(split, max(1, tiles_p // 4), max(1, (1 << 25) // (geo["G"] * geo["KC"] * geo["Cog"])))
        split = max(split, 1)
    tiles_per_split = triton.cdiv(tiles_p, split)
    split = triton.cdiv(tiles_p, tiles_per_split)
    part = torch.empty(split, geo["G"], geo["KC"], geo["Cog"], dtype=acc_dtype, device=device)
    grid = (tiles_k, tiles_n, geo["G"] * split)
    args = (gout, x, offset_c, mask_c if mask_c is not None else offset_c, part,
            *_conv_args(geo), geo["G"], tiles_per_split, *geo["conv"])
    meta = dict(common, BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                CHUNK=_chunk(geo, cfg["BLOCK_K"]), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_dcn_bwd_wide_weight_kernel, grid, args, meta, "deform_conv2d", dtype, device)
    gw = part.sum(0) if split > 1 else part[0]
    return goff, (gmsk if mask_c is not None else None), gw
