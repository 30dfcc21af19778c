"""Triton kernels of the LMGA graph aggregation (MEGAN's learned message passing).

Independently at every pixel, for P node feature vectors E_0 .. E_{P-1} (c
channels each) and every ordered pair p != q::

    s[p, q] = w2 . leaky_relu(w1 @ |E_p - E_q| + b1, negative_slope)
    A[p, :] = softmax over q != p of s[p, q]            (no self loops)
    out[p]  = sum_{q != p} A[p, q] * E_q

for nodes (b, P, c, h, w), w1 (hd, c), b1 (hd,), w2 (hd,).  Layout of the
file (as in Liger-Kernel's ops files): private ``@triton.jit`` helpers and
kernels first, then the host launchers :func:`graph_aggregate_forward` and
:func:`graph_aggregate_backward`.  Nothing is registered with
``torch.library`` here; ``megan_fast.ops.graph_aggregate`` wires the
launchers into the op.

Design
------
The nodes are viewed as (b, P, c, HW): pixels are the contiguous axis.  A
program owns a tile of BLOCK_PIX contiguous pixels of one batch item and does
everything for them in registers.  Every global access is a [KC, BLOCK_PIX]
chunk (KC channels) of one node, or a [BLOCK_PIX] row of A, coalesced along
the pixels.  Nothing of size (b, P, P, c, h, w) or (b, P, P, hd, h, w) ever
touches global memory, and nothing but the inputs is saved for the backward.

* P (2..8 in practice) is a constexpr: every loop over nodes and node pairs
  is unrolled with ``tl.static_range``, and the per-pixel quantities (hidden
  layers, scores, adjacency, score gradients) are kept as *tuples* of
  register tensors indexed by compile-time pair indices: no padding of P to
  a power of two, no "extract entry (p, q)" reductions.
* The channel axis is walked in chunks of KC by a (not unrolled) runtime
  loop with the chunk loop *outside* the pair loops: each pass reads every
  node chunk once and forms all pairs' differences in registers.  Only
  small per-pair accumulators cross chunks, so registers do not grow with c.
* The MLP input d = |E_p - E_q| is symmetric, so the hidden layer
  z = w1 @ d ([hd, c] x [c, BLOCK_PIX]) and the score are computed once per
  unordered pair (P(P-1)/2 of them) and serve both s[p, q] and s[q, p].
  Per chunk, z += w1[:, chunk] @ d[chunk] is a ``tl.dot`` when hd and c are
  both >= 16 (or when the broadcast temporary would not fit in registers),
  with hd padded to HD_PAD and c to a multiple of KC = 16 (tl.dot's smallest
  K; one mma k-step), padding read as 0 (padded hidden units have
  w1 = b1 = w2 = 0 and contribute exactly 0; padded channels have d = 0).
  Otherwise (tiny hd / c) a broadcast multiply + sum over one chunk holding
  all channels, which wastes nothing.

Forward ``_ga_fwd_kernel``, grid (b * cdiv(HW, BLOCK_PIX),):
    1. one pass over the chunks: z of every pair (tuple of [HD_PAD, BLOCK_PIX]);
    2. scores, row softmax over q != p, max-subtracted (A[p, p] = 0 exactly);
    3. a second pass: out_p = sum_{q != p} A[p, q] E_q, stored chunk by chunk;
    4. optionally A itself (zero diagonal) -> adjacency (b, P, P, h, w).

Backward (recomputes z, s and A).  With dO_p = grad_out[p]::

    dE_q += A[p, q] dO_p                                   (aggregation)
    dA[p, q] = dO_p . E_q
    ds[p, q] = A[p, q] (dA[p, q] - sum_r A[p, r] dA[p, r])  (softmax Jacobian)
    for every unordered pair {i, j}, with d = |E_i - E_j|, z = w1 @ d + b1:
        g   = ds[i, j] + ds[j, i]              (s[i, j] = s[j, i]: one MLP, both scores)
        dw2 += g * leaky_relu(z)
        dz  = g * w2 * leaky_relu'(z)          (leaky_relu'(z) = 1 if z > 0 else slope,
                                                torch's value at z = 0)
        dw1 += dz d^T,  db1 += dz,  dd = w1^T dz
        dE_i += dd * sign(E_i - E_j),  dE_j -= dd * sign(E_i - E_j)
                                               (sign(0) = 0: torch.abs' derivative at 0)

``_ga_bwd_kernel`` is persistent: NPROG programs, program pid walking the
pixel tiles pid, pid + NPROG, ...; per tile:
    1. pass 1 over the chunks: z of every pair (kept in registers), A;
    2. pass 2: dA of every ordered pair (both E and dO chunks read once);
       then ds, g per pair, and the per-pair MLP backward down to dz (kept
       in registers, in the tl.dot operand type), dw2 and db1;
    3. pass 3: per chunk, the node gradients of *all* P nodes (aggregation
       term plus +-sign*dd of every pair) are accumulated in registers and
       stored once: complete, in the output dtype, no scratch buffer, no
       read-modify-write of grad_nodes, no atomics (each tile belongs to one
       program); and dw1[:, chunk] += sum over pairs dz d^T.

Weight gradients: a program's db1 and dw2 are accumulated in registers over
all of its tiles; its dw1 (whose chunk index is a runtime loop variable, so
it cannot live in a register tuple) is accumulated by read-modify-write in
its own row of a zero-initialised [NPROG, hd*c + 2*hd] fp32 buffer (once per
chunk and tile, [HD_PAD, KC] elements; the row is touched by this program
only, always through the same pointer tensor, so by the same threads).  The
host sums the rows with ``torch.sum``.  Deterministic (fixed program -> tile
assignment and reduction order) and contention-free; NPROG is capped at a
few programs per SM, so the buffer stays ~1 MB at MEGAN's sizes whatever b
and HW are.  fp32 atomics into a single [hd*c + 2*hd] vector instead would
make every program hammer the same ~1k addresses and give run-to-run
different sums.

Precision (the table in megan_fast/triton/_utils.py, one for the four ops):
everything element-wise in fp32 (fp64 for fp64 inputs, interpreter only);
fp32 tl.dot's are exact IEEE products unless the user allowed TF32, fp64
ones always; fp16 / bf16 operands (w1, d, dz) are fed to tl.dot in their own
type with fp32 accumulation.  Triton passes Python floats as fp32: the launchers split
negative_slope into an fp32 pair hi + lo, added in the compute type (~48
bits, plenty for the fp64 checks).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from megan_fast.triton._utils import dot, launch, num_sms, numel_needs_int64, precision, runnable

__all__ = ["graph_aggregate_forward", "graph_aggregate_backward"]


# =============================================================================
# JIT helpers
# =============================================================================


@triton.jit
def _leaky(z, slope):
    return tl.where(z > 0, z, z * slope)


@triton.jit
def _tile(bi, pix0, C, HW, P: tl.constexpr, KC: tl.constexpr, BLOCK_PIX: tl.constexpr):
    """Addressing of one pixel tile of batch item bi.

    Returns the offsets of channel chunk 0 of node 0 ([KC, BLOCK_PIX]: channels
    0..KC-1, pixels pix0..pix0+BLOCK_PIX-1 of the (b, P, C, HW) nodes), the
    chunk's channel indices, the pixel indices and their mask, CHW = C*HW and
    HW.  bi may be int64: then every offset derived from it (CHW, HW too) is.
    """
    pix = pix0 + tl.arange(0, BLOCK_PIX)
    pix_ok = pix < HW
    ch = tl.arange(0, KC)
    hw = bi * 0 + HW
    chw = C * hw
    offs = bi * P * chw + ch[:, None] * hw + pix[None, :]
    return offs, ch, pix, pix_ok, chw, hw


@triton.jit
def _chunk_mask(ch, pix_ok, k, C, KC: tl.constexpr):
    return (ch < C - k * KC)[:, None] & pix_ok[None, :]


@triton.jit
def _load_chunks(ptr, offs, msk, k, chw, hw, P: tl.constexpr, KC: tl.constexpr, CDT: tl.constexpr):
    """Channel chunk k of every node: a tuple of P [KC, BLOCK_PIX] tiles in CDT
    (padded channels / pixels read 0).  Node n's chunk k is at offs + n*chw + k*KC*hw."""
    base = offs + k * KC * hw
    t = ()
    for n in tl.static_range(P):
        t = t + (tl.load(ptr + (base + n * chw), mask=msk, other=0.0).to(CDT),)
    return t


@triton.jit
def _w1_chunk(w1_ptr, k, C, HD, KC: tl.constexpr, HD_PAD: tl.constexpr, TRANS: tl.constexpr):
    """Columns k*KC .. k*KC+KC-1 of w1 (hd, C), zero padded: [HD_PAD, KC], or [KC, HD_PAD] if TRANS."""
    hh = tl.arange(0, HD_PAD)
    cc = k * KC + tl.arange(0, KC)
    if TRANS:
        w = tl.load(w1_ptr + hh[None, :] * C + cc[:, None], mask=(hh[None, :] < HD) & (cc[:, None] < C), other=0.0)
    else:
        w = tl.load(w1_ptr + hh[:, None] * C + cc[None, :], mask=(hh[:, None] < HD) & (cc[None, :] < C), other=0.0)
    return w


@triton.jit
def _pair_hidden(
    x_ptr, w1_ptr, offs, ch, pix_ok, C, HD, chw, hw,
    P: tl.constexpr, NCH: tl.constexpr, KC: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_PIX: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr, DOT_DT: tl.constexpr,
):
    """w1 @ |E_p - E_q| (no bias) for every unordered pair p < q of one tile.

    Returns a tuple of P(P-1)/2 [HD_PAD, BLOCK_PIX] tensors in pair order
    (0,1), (0,2), .., (P-2,P-1): pair (p, q) at p*(2P-p-1)/2 + q-p-1.  The
    channel loop is outermost, so every node chunk is read once and the MLP
    input of each pair is formed in registers; only the accumulators cross
    chunks.
    """
    Z = ()
    for e in tl.static_range(P * (P - 1) // 2):
        Z = Z + (tl.zeros([HD_PAD, BLOCK_PIX], dtype=CDT),)
    for k in range(NCH):
        E = _load_chunks(x_ptr, offs, _chunk_mask(ch, pix_ok, k, C, KC), k, chw, hw, P, KC, CDT)
        w = _w1_chunk(w1_ptr, k, C, HD, KC, HD_PAD, False)
        Zn = ()
        for p in tl.static_range(P):
            for q in tl.static_range(p + 1, P):
                d = tl.abs(E[p] - E[q])
                if USE_DOT:
                    zz = dot(w.to(DOT_DT), d.to(DOT_DT), Z[p * (2 * P - p - 1) // 2 + q - p - 1], IEEE)
                else:
                    # Tiny hd / c: [HD_PAD, KC, BLOCK_PIX] products summed over the channels.
                    zz = Z[p * (2 * P - p - 1) // 2 + q - p - 1] + tl.sum(
                        w.to(CDT)[:, :, None] * d[None, :, :], axis=1)
                Zn = Zn + (zz,)
        Z = Zn
    return Z


@triton.jit
def _scores_adjacency(Z, b1, w2, slope, P: tl.constexpr, BLOCK_PIX: tl.constexpr, CDT: tl.constexpr):
    """Scores and row softmax over q != p (max-subtracted) of one tile.

    Returns the adjacency as a row-major tuple of P*P [BLOCK_PIX] vectors
    (A[p*P+p] = 0 exactly).  The score of a pair serves both directions.
    """
    s = ()
    for e in tl.static_range(P * (P - 1) // 2):
        s = s + (tl.sum(w2[:, None] * _leaky(Z[e] + b1[:, None], slope), axis=0),)
    zero = tl.zeros([BLOCK_PIX], dtype=CDT)
    A = ()
    for p in tl.static_range(P):
        row = ()
        for q in tl.static_range(P):
            if q < p:
                row = row + (s[q * (2 * P - q - 1) // 2 + p - q - 1],)
            elif q > p:
                row = row + (s[p * (2 * P - p - 1) // 2 + q - p - 1],)
            else:
                row = row + (zero,)
        m = tl.full([BLOCK_PIX], float("-inf"), dtype=CDT)
        for q in tl.static_range(P):
            if q != p:
                m = tl.maximum(m, row[q])
        # Every exponent is <= 0 and the row maximum contributes exp(0) = 1:
        # den >= 1, no overflow and no 0/0 (P >= 2, so a row has >= 1 entry).
        den = zero
        ex = ()
        for q in tl.static_range(P):
            if q == p:
                ex = ex + (zero,)
            else:
                eq = tl.exp(row[q] - m)
                den += eq
                ex = ex + (eq,)
        rden = 1.0 / den
        for q in tl.static_range(P):
            if q == p:
                A = A + (zero,)
            else:
                A = A + (ex[q] * rden,)
    return A


# =============================================================================
# Kernels
# =============================================================================


@triton.jit
def _ga_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, out_ptr, adj_ptr,
    C, HW, HD, TILES, slope_hi, slope_lo,
    P: tl.constexpr, NCH: tl.constexpr, KC: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_PIX: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, STORE_ADJ: tl.constexpr, INT64: tl.constexpr,
    CDT: tl.constexpr, DOT_DT: tl.constexpr,
):
    """One program per (batch item, tile of BLOCK_PIX pixels); grid (b * TILES,)."""
    pid = tl.program_id(0)
    bi = pid // TILES
    pix0 = (pid - bi * TILES) * BLOCK_PIX
    if INT64:
        bi = bi.to(tl.int64)
    slope = tl.cast(slope_hi, CDT) + tl.cast(slope_lo, CDT)
    hh = tl.arange(0, HD_PAD)
    b1 = tl.load(b1_ptr + hh, mask=hh < HD, other=0.0).to(CDT)
    w2 = tl.load(w2_ptr + hh, mask=hh < HD, other=0.0).to(CDT)
    offs, ch, pix, pix_ok, chw, hw = _tile(bi, pix0, C, HW, P, KC, BLOCK_PIX)

    Z = _pair_hidden(x_ptr, w1_ptr, offs, ch, pix_ok, C, HD, chw, hw,
                     P, NCH, KC, HD_PAD, BLOCK_PIX, USE_DOT, IEEE, CDT, DOT_DT)
    A = _scores_adjacency(Z, b1, w2, slope, P, BLOCK_PIX, CDT)

    # out_p = sum_{q != p} A[p, q] E_q, chunk by chunk (each node chunk read once).
    for k in range(NCH):
        msk = _chunk_mask(ch, pix_ok, k, C, KC)
        E = _load_chunks(x_ptr, offs, msk, k, chw, hw, P, KC, CDT)
        for p in tl.static_range(P):
            acc = tl.zeros([KC, BLOCK_PIX], dtype=CDT)
            for q in tl.static_range(P):
                if q != p:
                    acc += A[p * P + q][None, :] * E[q]
            tl.store(out_ptr + (offs + k * KC * hw + p * chw), acc.to(out_ptr.dtype.element_ty), mask=msk)

    if STORE_ADJ:
        # adjacency (b, P, P, HW); the diagonal entries are exact zeros.
        abase = bi * P * P * hw + pix
        for p in tl.static_range(P):
            for q in tl.static_range(P):
                tl.store(adj_ptr + abase + (p * P + q) * hw, A[p * P + q].to(adj_ptr.dtype.element_ty),
                         mask=pix_ok)


@triton.jit
def _ga_bwd_kernel(
    gout_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, gx_ptr, wpart_ptr,
    C, HW, HD, TILES, NUM_TILES, NPROG, slope_hi, slope_lo,
    P: tl.constexpr, NCH: tl.constexpr, KC: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_PIX: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, INT64: tl.constexpr,
    CDT: tl.constexpr, DOT_DT: tl.constexpr,
):
    """Persistent: program pid handles pixel tiles pid, pid + NPROG, ... of the b * TILES tiles.

    wpart_ptr: the zero-initialised [NPROG, HD*C + 2*HD] weight-gradient
    partial sums; row pid belongs to this program alone.
    """
    pid = tl.program_id(0)
    slope = tl.cast(slope_hi, CDT) + tl.cast(slope_lo, CDT)
    hh = tl.arange(0, HD_PAD)
    b1 = tl.load(b1_ptr + hh, mask=hh < HD, other=0.0).to(CDT)
    w2 = tl.load(w2_ptr + hh, mask=hh < HD, other=0.0).to(CDT)
    cc = tl.arange(0, KC)
    row = wpart_ptr + pid.to(tl.int64) * (HD * C + 2 * HD)
    db1 = tl.zeros([HD_PAD], dtype=CDT)
    dw2 = tl.zeros([HD_PAD], dtype=CDT)

    for t in range(pid, NUM_TILES, NPROG):
        bi = t // TILES
        pix0 = (t - bi * TILES) * BLOCK_PIX
        if INT64:
            bi = bi.to(tl.int64)
        offs, ch, pix, pix_ok, chw, hw = _tile(bi, pix0, C, HW, P, KC, BLOCK_PIX)

        # ---- 1. recompute the hidden layers (kept: the backward reuses them) and A
        Z = _pair_hidden(x_ptr, w1_ptr, offs, ch, pix_ok, C, HD, chw, hw,
                         P, NCH, KC, HD_PAD, BLOCK_PIX, USE_DOT, IEEE, CDT, DOT_DT)
        A = _scores_adjacency(Z, b1, w2, slope, P, BLOCK_PIX, CDT)

        # ---- 2. dA[p, q] = dO_p . E_q, all ordered pairs in one pass over the chunks.
        # (Kept per ordered pair rather than folded into per-pair sums h and
        # r_p = dO_p . out_p: that saves a few vectors but turns the exact
        # cancellation in ds for P = 2 (A = 1) into fp32 noise.)
        dA = ()
        for e in tl.static_range(P * P):
            dA = dA + (tl.zeros([BLOCK_PIX], dtype=CDT),)
        for k in range(NCH):
            msk = _chunk_mask(ch, pix_ok, k, C, KC)
            E = _load_chunks(x_ptr, offs, msk, k, chw, hw, P, KC, CDT)
            G = _load_chunks(gout_ptr, offs, msk, k, chw, hw, P, KC, CDT)
            dAn = ()
            for p in tl.static_range(P):
                for q in tl.static_range(P):
                    if q == p:
                        dAn = dAn + (dA[p * P + q],)
                    else:
                        dAn = dAn + (dA[p * P + q] + tl.sum(G[p] * E[q], axis=0),)
            dA = dAn
        # ds[p, q] = A[p, q] (dA[p, q] - sum_r A[p, r] dA[p, r])    (softmax Jacobian)
        rowdot = ()
        for p in tl.static_range(P):
            r = tl.zeros([BLOCK_PIX], dtype=CDT)
            for q in tl.static_range(P):
                if q != p:
                    r += A[p * P + q] * dA[p * P + q]
            rowdot = rowdot + (r,)
        # Per unordered pair: g = ds[p, q] + ds[q, p] (s[p, q] = s[q, p]: one MLP,
        # both scores), then the MLP backward down to dz = g w2 leaky_relu'(z).
        # Padded pixels read dO = 0, so dA = g = dz = 0 there: they add exactly
        # nothing to the weight gradients.
        DZ = ()
        for p in tl.static_range(P):
            for q in tl.static_range(p + 1, P):
                g = (A[p * P + q] * (dA[p * P + q] - rowdot[p])
                     + A[q * P + p] * (dA[q * P + p] - rowdot[q]))
                z = Z[p * (2 * P - p - 1) // 2 + q - p - 1] + b1[:, None]
                dw2 += tl.sum(_leaky(z, slope) * g[None, :], axis=1)
                # leaky_relu'(z) = 1 if z > 0 else slope (torch's value at z = 0).
                dz = tl.where(z > 0, 1.0, slope) * w2[:, None] * g[None, :]
                db1 += tl.sum(dz, axis=1)
                if USE_DOT:
                    DZ = DZ + (dz.to(DOT_DT),)  # a tl.dot operand below
                else:
                    DZ = DZ + (dz,)

        # ---- 3. per channel chunk: dE of every node (complete: stored once) and dw1
        for k in range(NCH):
            msk = _chunk_mask(ch, pix_ok, k, C, KC)
            E = _load_chunks(x_ptr, offs, msk, k, chw, hw, P, KC, CDT)
            G = _load_chunks(gout_ptr, offs, msk, k, chw, hw, P, KC, CDT)
            # Aggregation term: dE_i = sum_{p != i} A[p, i] dO_p.
            acc = ()
            for i in tl.static_range(P):
                a = tl.zeros([KC, BLOCK_PIX], dtype=CDT)
                for p in tl.static_range(P):
                    if p != i:
                        a += A[p * P + i][None, :] * G[p]
                acc = acc + (a,)
            wt = _w1_chunk(w1_ptr, k, C, HD, KC, HD_PAD, True)  # [KC, HD_PAD]: w1^T
            dw1 = tl.zeros([HD_PAD, KC], dtype=CDT)
            for i in tl.static_range(P):
                for j in tl.static_range(i + 1, P):
                    diff = E[i] - E[j]
                    dzp = DZ[i * (2 * P - i - 1) // 2 + j - i - 1]
                    if USE_DOT:
                        dw1 = dot(dzp, tl.trans(tl.abs(diff).to(DOT_DT)), dw1, IEEE)  # += dz |d|^T
                        dd = dot(wt.to(DOT_DT), dzp, tl.zeros([KC, BLOCK_PIX], dtype=CDT), IEEE)  # w1^T dz
                    else:
                        dw1 += tl.sum(dzp[:, None, :] * tl.abs(diff)[None, :, :], axis=2)
                        dd = tl.sum(wt.to(CDT)[:, :, None] * dzp[None, :, :], axis=1)
                    # d|x|/dx = sign(x), 0 at x = 0 (torch's convention): +dd to E_i, -dd to E_j.
                    sdd = tl.where(diff > 0, dd, tl.where(diff < 0, -dd, 0.0))
                    acc = acc[:i] + (acc[i] + sdd,) + acc[i + 1:]
                    acc = acc[:j] + (acc[j] - sdd,) + acc[j + 1:]
            for i in tl.static_range(P):
                tl.store(gx_ptr + (offs + k * KC * hw + i * chw), acc[i].to(gx_ptr.dtype.element_ty), mask=msk)
            # This program's dw1 partial sums, columns of chunk k (its own row: no race;
            # the same threads read and write the same elements every tile).
            wptr = row + hh[:, None] * C + (k * KC + cc)[None, :]
            wmsk = (hh[:, None] < HD) & ((k * KC + cc) < C)[None, :]
            tl.store(wptr, tl.load(wptr, mask=wmsk, other=0.0) + dw1, mask=wmsk)

    tl.store(row + HD * C + hh, db1, mask=hh < HD)
    tl.store(row + HD * C + HD + hh, dw2, mask=hh < HD)


# =============================================================================
# Host side
# =============================================================================



def _split_slope(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo fp32-representable (Triton passes floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _config(p: int, c: int, hd: int, device: torch.device, backward: bool) -> dict:
    """Tile sizes and the hidden-layer strategy (see the module docstring)."""
    # tl.dot when both sides are real matrices, or when the broadcast product
    # [HD_PAD, C_PAD, BLOCK_PIX] would not fit in registers; pads to >= 16 then.
    use_dot = (hd >= 16 and c >= 16) or _pow2(hd, 1) * _pow2(c, 1) > 128
    lo = 16 if use_dot else 1
    c_pad, hd_pad = _pow2(c, lo), _pow2(hd, lo)
    # Channel chunk: the K extent of one tl.dot (16 = one mma k-step) and the
    # height of every [KC, BLOCK_PIX] tile; the broadcast path takes all channels.
    kc = min(c_pad, 16) if use_dot else c_pad
    cfg = dict(KC=kc, NCH=c_pad // kc, HD_PAD=hd_pad, USE_DOT=use_dot)
    if device.type != "cuda":
        # Interpreter: the smallest tiles tl.dot accepts keep numpy temporaries
        # small, and the tiny test problems get tails and several tiles.
        return dict(cfg, BLOCK_PIX=16, num_warps=4, progs_per_sm=None)
    # sm_90, chosen from ptxas -v on kernels compiled ahead of time (timed on an
    # H100 afterwards, docs/PERFORMANCE.md; not tuned per shape): the register footprint grows with the per-pair
    # tensors, so fewer pixels per program for larger P.  MEGAN (P=5, c=64,
    # hd=16): forward 96 (fp16/bf16) / 178 (fp32) registers, no spills;
    # backward 255 registers and 28-116 bytes of spills.  P = 7, 8 spill more
    # in the backward (1-2.7 KB).
    if backward:
        return dict(cfg, BLOCK_PIX=64 if p <= 2 else 32, num_warps=8, progs_per_sm=2)
    return dict(cfg, BLOCK_PIX=64 if p <= 3 else 32 if p <= 6 else 16, num_warps=4, progs_per_sm=None)


def _common_meta(cfg: dict, p: int, dtype: torch.dtype, device: torch.device, int64: bool) -> dict:
    prec = precision(dtype, device)
    dot_dt = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, prec.compute)
    return dict(
        P=p, NCH=cfg["NCH"], KC=cfg["KC"], HD_PAD=cfg["HD_PAD"], BLOCK_PIX=cfg["BLOCK_PIX"], USE_DOT=cfg["USE_DOT"],
        IEEE=prec.ieee, INT64=int64, CDT=prec.compute, DOT_DT=dot_dt, num_warps=cfg["num_warps"],
    )


def graph_aggregate_forward(
    nodes: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, negative_slope: float, return_adjacency: bool
) -> tuple[Tensor, Tensor]:
    """Forward of the graph aggregation.

    nodes (b, p, c, h, w), w1 (hd, c), b1 (hd,), w2 (hd,) -> (out (b, p, c, h, w),
    adjacency (b, p, p, h, w) with a zero diagonal, or ``nodes.new_empty(0)``
    when not return_adjacency).  Outputs are contiguous, in the nodes' dtype.
    """
    runnable(nodes, "graph_aggregate")
    b, p, c, h, w = nodes.shape
    hd = w1.shape[0]
    hw = h * w
    out = nodes.new_empty(b, p, c, h, w)
    adj = nodes.new_empty(b, p, p, h, w) if return_adjacency else nodes.new_empty(0)
    if b * hw == 0 or (c == 0 and not return_adjacency):
        return out, adj
    x = nodes.contiguous()
    cfg = _config(p, c, hd, nodes.device, backward=False)
    tiles = triton.cdiv(hw, cfg["BLOCK_PIX"])
    slope_hi, slope_lo = _split_slope(float(negative_slope))
    int64 = numel_needs_int64(x, adj)
    meta = _common_meta(cfg, p, nodes.dtype, nodes.device, int64)
    args = (x, w1.contiguous(), b1.contiguous(), w2.contiguous(), out, adj if return_adjacency else out,
            c, hw, hd, tiles, slope_hi, slope_lo)
    launch(_ga_fwd_kernel, (b * tiles,), args, dict(meta, STORE_ADJ=bool(return_adjacency)), "graph_aggregate",
           nodes.dtype, nodes.device)
    return out, adj


def graph_aggregate_backward(
    grad_out: Tensor, nodes: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, negative_slope: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_nodes, grad_w1, grad_b1, grad_w2) of :func:`graph_aggregate_forward`'s out.

    Recomputes the scores and the adjacency; no host synchronisation.
    """
    runnable(nodes, "graph_aggregate")
    b, p, c, h, w = nodes.shape
    hd = w1.shape[0]
    hw = h * w
    device, dtype = nodes.device, nodes.dtype
    if b * hw * c == 0:
        # No pixels: nothing flows.  c = 0: dA = dO . E = 0, so ds = 0 and the
        # weights get nothing either.
        return (torch.zeros_like(nodes, memory_format=torch.contiguous_format), torch.zeros_like(w1),
                torch.zeros_like(b1), torch.zeros_like(w2))
    x = nodes.contiguous()
    gout = grad_out.contiguous()
    grad_nodes = torch.empty(b, p, c, h, w, dtype=dtype, device=device)
    cfg = _config(p, c, hd, device, backward=True)
    tiles = triton.cdiv(hw, cfg["BLOCK_PIX"])
    num_tiles = b * tiles
    if cfg["progs_per_sm"] is None:
        nprog = min(num_tiles, 3)  # interpreter: several programs, several tiles each
    else:
        nprog = min(num_tiles, cfg["progs_per_sm"] * num_sms(device))
    wpart = torch.zeros(nprog, hd * c + 2 * hd, dtype=precision(dtype, device).accumulate, device=device)
    slope_hi, slope_lo = _split_slope(float(negative_slope))
    meta = _common_meta(cfg, p, dtype, device, numel_needs_int64(x))
    args = (gout, x, w1.contiguous(), b1.contiguous(), w2.contiguous(), grad_nodes, wpart,
            c, hw, hd, tiles, num_tiles, nprog, slope_hi, slope_lo)
    launch(_ga_bwd_kernel, (nprog,), args, meta, "graph_aggregate", dtype, device)
    wsum = wpart.sum(0)
    # Separate tensors (not views of one buffer), in the weights' dtype.
    grad_w1 = wsum[: hd * c].view(hd, c).to(dtype, copy=True)
    grad_b1 = wsum[hd * c: hd * c + hd].to(dtype, copy=True)
    grad_w2 = wsum[hd * c + hd:].to(dtype, copy=True)
    return grad_nodes, grad_w1, grad_b1, grad_w2
