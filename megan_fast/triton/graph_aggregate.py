"""Triton kernels of the LMGA graph aggregation (MEGAN's learned message passing).

Independently at every pixel, for p node feature vectors E_0 .. E_{P-1} (c
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
everything for them in registers; every global access is a [C_PAD,
BLOCK_PIX] tile of one node (or a [BLOCK_PIX] row of A), coalesced along the
pixels.  P (2..8 in practice) is a constexpr: every loop over nodes and node
pairs is unrolled with ``tl.static_range``, and the per-pixel scores, the
adjacency and the score gradients are kept as *tuples* of [BLOCK_PIX] vectors
indexed by the (compile-time) flat pair index p*P + q, so no register is
spent on padding P to a power of two and no "extract row q" reduction is
needed.

The MLP input d = |E_p - E_q| is symmetric in p and q, so the hidden layer
z = w1 @ d + b1 ([hd, c] x [c, BLOCK_PIX]) and the score are evaluated once
per unordered pair.  w1 is loaded once per program, padded to [HD_PAD,
C_PAD] with zeros (padded hidden units have w1 = b1 = w2 = 0 and contribute
exactly 0; padded channels have d = 0 and w1 = 0).  The product is a
``tl.dot`` when hd and c are both >= 16 (or when the broadcast temporary
[HD_PAD, C_PAD, BLOCK_PIX] would be too large for registers), with both
padded to powers of two >= 16 (tl.dot's smallest operand); otherwise a
broadcast multiply + sum over the channel axis, which wastes nothing for
tiny hd / c.  Nothing of size (b, P, P, c, h, w) or (b, P, P, hd, h, w) ever
touches global memory.

Forward, grid (b * cdiv(HW, BLOCK_PIX),):
    1. scores of the P(P-1)/2 unordered pairs (row-major tuple S, with
       S[q*P+p] the same tensor as S[p*P+q]);
    2. row softmax over q != p, max-subtracted (A[p*P+p] = 0 exactly);
    3. out_p = sum_{q != p} A[p, q] E_q, one [C_PAD, BLOCK_PIX] accumulator
       at a time (E_q re-read from L1/L2 rather than kept in registers);
    4. optionally A itself (zero diagonal) -> adjacency (b, P, P, h, w).

Backward (recomputes s and A; nothing but the inputs is saved).  With
dO_p = grad_out[p]:

    dE_q += A[p, q] dO_p                                   (aggregation)
    dA[p, q] = dO_p . E_q
    ds[p, q] = A[p, q] (dA[p, q] - sum_r A[p, r] dA[p, r])  (softmax Jacobian)
    for every unordered pair {i, j}, with d = |E_i - E_j|, z = w1 @ d + b1:
        g   = ds[i, j] + ds[j, i]              (s[i, j] = s[j, i]: one MLP, both scores)
        dw2 += g * leaky_relu(z)
        dz  = g * w2 * leaky_relu'(z)          (leaky_relu'(z) = 1 if z > 0 else slope,
                                                torch's convention at z = 0)
        dw1 += dz d^T,  db1 += dz,  dd = w1^T dz
        dE_i += dd * sign(E_i - E_j),  dE_j -= dd * sign(E_i - E_j)
                                               (sign(0) = 0: torch.abs' derivative at 0)

Kernel ``_ga_bwd_kernel``, a persistent grid of NPROG programs, each looping
over pixel tiles t = pid, pid + NPROG, ...:
    1. recompute S and A as in the forward;
    2. row by row: dA[p, :] (one channel reduction per (p, q)), then ds;
    3. node-outer over i: the register accumulator of dE_i starts with the
       aggregation term sum_p A[p, i] dO_p, adds what the pairs {k, i}, k < i,
       left in the fp32 scratch for node i, then runs the pairs {i, j}, j > i:
       one MLP backward per unordered pair, +sign*dd into the register
       accumulator of i, -sign*dd read-modify-written into the scratch of j
       (plain store when i = 0, so the scratch needs no zero fill).  dE_i is
       complete at the end of its iteration and is stored once, in the output
       dtype.  The scratch is grad_nodes itself for fp32 / fp64 (node j's
       final store comes later than every partial write to it) and an fp32
       buffer for fp16 / bf16 (partial sums are never rounded to 16 bits).
       Different iterations touch the same scratch addresses from possibly
       different threads, hence a ``tl.debug_barrier()`` (bar.sync, which
       also orders the CTA's global memory accesses) after each node.
    Each pixel tile is owned by one program, so dE needs no atomics.

Weight gradients: every program accumulates its share of dw1 ([HD_PAD,
C_PAD]), db1 and dw2 in fp32 registers across all of its tiles and writes
them once to row pid of a [NPROG, hd*c + 2*hd] fp32 buffer, summed over the
programs with ``torch.sum`` on the host.  Deterministic (fixed program ->
tile assignment, fixed reduction order), contention-free and cheap: NPROG is
capped at a few programs per SM, so the buffer stays ~1 MB for MEGAN's sizes
whatever b and HW are.  fp32 atomics into one [hd*c + 2*hd] vector would make
every program hit the same ~1k addresses and give run-to-run different sums.

Precision: everything element-wise in fp32 (fp64 for fp64 inputs).  fp32 and
fp64 tl.dot's use ``input_precision="ieee"`` (no TF32, to match torch);
fp16 / bf16 operands (w1, d, dz) are fed to tl.dot in their own type with
fp32 accumulation.  Triton passes Python floats as fp32: the launchers split
negative_slope into an fp32 pair hi + lo, added in the compute type (~48
bits, plenty for the fp64 checks).
"""

from __future__ import annotations

import functools
import os
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["graph_aggregate_forward", "graph_aggregate_backward"]


# =============================================================================
# JIT helpers
# =============================================================================


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, CDT: tl.constexpr):
    """a @ b accumulated in CDT.  IEEE: exact fp32/fp64 products (no TF32)."""
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee", out_dtype=CDT)
    else:
        r = tl.dot(a, b, out_dtype=CDT)
    return r


@triton.jit
def _tile_offsets(bi, pix0, C, HW, P: tl.constexpr, C_PAD: tl.constexpr, BLOCK_PIX: tl.constexpr):
    """Offsets and mask of the [C_PAD, BLOCK_PIX] tile of node 0 (node n: + n*CHW).

    Also CHW = C*HW, HW, the [BLOCK_PIX] pixel indices and their mask.  bi may
    be int64: then every offset derived from it (CHW and HW included) is.
    """
    pix = pix0 + tl.arange(0, BLOCK_PIX)
    pix_ok = pix < HW
    ch = tl.arange(0, C_PAD)
    hw = bi * 0 + HW
    chw = C * hw
    offs = bi * P * chw + ch[:, None] * HW + pix[None, :]
    msk = (ch[:, None] < C) & pix_ok[None, :]
    return offs, msk, chw, hw, pix, pix_ok


@triton.jit
def _load_node(ptr, offs, msk, n, chw, CDT: tl.constexpr):
    """[C_PAD, BLOCK_PIX] tile of node n (padded channels / pixels read 0), in CDT."""
    return tl.load(ptr + offs + n * chw, mask=msk, other=0.0).to(CDT)


@triton.jit
def _hidden(d, w1c, w1d, b1, USE_DOT: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr):
    """Hidden pre-activation z = w1 @ d + b1, [HD_PAD, BLOCK_PIX] in CDT.

    d: [C_PAD, BLOCK_PIX] (CDT); w1c: w1 in CDT; w1d: w1 in the dot operand type.
    """
    if USE_DOT:
        z = _mm(w1d, d.to(w1d.dtype), IEEE, CDT)
    else:
        # Tiny hd / c: [HD_PAD, C_PAD, BLOCK_PIX] products summed over the channels.
        z = tl.sum(w1c[:, :, None] * d[None, :, :], axis=1)
    return z + b1[:, None]


@triton.jit
def _leaky(z, slope):
    return tl.where(z > 0, z, z * slope)


@triton.jit
def _pair_scores(
    x_ptr, offs, msk, chw, w1c, w1d, b1, w2, slope,
    P: tl.constexpr, BLOCK_PIX: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr,
):
    """Scores s[p, q] of one pixel tile as a row-major tuple of P*P [BLOCK_PIX] vectors.

    The MLP runs once per unordered pair (p < q); entry q*P + p (q > p) is the
    same tensor as p*P + q.  Diagonal entries are zero placeholders (never read).
    """
    zero = tl.zeros([BLOCK_PIX], dtype=CDT)
    S = ()
    for p in tl.static_range(P):
        ep = _load_node(x_ptr, offs, msk, p, chw, CDT)
        for q in tl.static_range(P):
            if q == p:
                S = S + (zero,)
            elif q < p:
                S = S + (S[q * P + p],)
            else:
                eq = _load_node(x_ptr, offs, msk, q, chw, CDT)
                z = _hidden(tl.abs(ep - eq), w1c, w1d, b1, USE_DOT, IEEE, CDT)
                S = S + (tl.sum(w2[:, None] * _leaky(z, slope), axis=0),)
    return S


@triton.jit
def _adjacency(S, P: tl.constexpr, BLOCK_PIX: tl.constexpr, CDT: tl.constexpr):
    """Row softmax of S over q != p (max-subtracted): tuple A of P*P vectors, A[p*P+p] = 0."""
    zero = tl.zeros([BLOCK_PIX], dtype=CDT)
    A = ()
    for p in tl.static_range(P):
        m = tl.full([BLOCK_PIX], float("-inf"), dtype=CDT)
        for q in tl.static_range(P):
            if q != p:
                m = tl.maximum(m, S[p * P + q])
        # Every exponent is <= 0 and the row maximum contributes exp(0) = 1:
        # den >= 1, no overflow and no 0/0 (P >= 2 so a row has >= 1 entry).
        den = tl.zeros([BLOCK_PIX], dtype=CDT)
        e = ()
        for q in tl.static_range(P):
            if q == p:
                e = e + (zero,)
            else:
                eq = tl.exp(S[p * P + q] - m)
                den += eq
                e = e + (eq,)
        rden = 1.0 / den
        for q in tl.static_range(P):
            if q == p:
                A = A + (zero,)
            else:
                A = A + (e[q] * rden,)
    return A


@triton.jit
def _load_weights(
    w1_ptr, b1_ptr, w2_ptr, C, HD,
    HD_PAD: tl.constexpr, C_PAD: tl.constexpr, CDT: tl.constexpr, DOT_DT: tl.constexpr,
):
    """w1 ([HD_PAD, C_PAD], zero padded) in CDT and in the dot operand type, b1, w2 ([HD_PAD])."""
    hh = tl.arange(0, HD_PAD)
    cc = tl.arange(0, C_PAD)
    h_ok = hh < HD
    w1 = tl.load(w1_ptr + hh[:, None] * C + cc[None, :], mask=h_ok[:, None] & (cc[None, :] < C), other=0.0)
    b1 = tl.load(b1_ptr + hh, mask=h_ok, other=0.0).to(CDT)
    w2 = tl.load(w2_ptr + hh, mask=h_ok, other=0.0).to(CDT)
    return w1.to(CDT), w1.to(DOT_DT), b1, w2


# =============================================================================
# Kernels
# =============================================================================


@triton.jit
def _ga_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, out_ptr, adj_ptr,
    C, HW, HD, TILES, slope_hi, slope_lo,
    P: tl.constexpr, C_PAD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_PIX: tl.constexpr,
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
    offs, msk, chw, hw, pix, pix_ok = _tile_offsets(bi, pix0, C, HW, P, C_PAD, BLOCK_PIX)
    w1c, w1d, b1, w2 = _load_weights(w1_ptr, b1_ptr, w2_ptr, C, HD, HD_PAD, C_PAD, CDT, DOT_DT)

    S = _pair_scores(x_ptr, offs, msk, chw, w1c, w1d, b1, w2, slope, P, BLOCK_PIX, USE_DOT, IEEE, CDT)
    A = _adjacency(S, P, BLOCK_PIX, CDT)

    # out_p = sum_{q != p} A[p, q] E_q: one accumulator live at a time; the E_q
    # tiles were read moments ago and come from L1/L2.
    for p in tl.static_range(P):
        acc = tl.zeros([C_PAD, BLOCK_PIX], dtype=CDT)
        for q in tl.static_range(P):
            if q != p:
                acc += A[p * P + q][None, :] * _load_node(x_ptr, offs, msk, q, chw, CDT)
        tl.store(out_ptr + offs + p * chw, acc.to(out_ptr.dtype.element_ty), mask=msk)

    if STORE_ADJ:
        # adjacency (b, P, P, HW); the diagonal entries are exact zeros.
        abase = bi * P * P * hw + pix
        for p in tl.static_range(P):
            for q in tl.static_range(P):
                tl.store(adj_ptr + abase + (p * P + q) * hw, A[p * P + q].to(adj_ptr.dtype.element_ty),
                         mask=pix_ok)


@triton.jit
def _ga_bwd_kernel(
    gout_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, gx_ptr, part_ptr, wpart_ptr,
    C, HW, HD, TILES, NUM_TILES, NPROG, slope_hi, slope_lo,
    P: tl.constexpr, C_PAD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_PIX: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, INT64: tl.constexpr,
    CDT: tl.constexpr, DOT_DT: tl.constexpr,
):
    """Persistent: program pid handles pixel tiles pid, pid + NPROG, ... of the b * TILES tiles.

    gx_ptr: grad_nodes (b, P, C, HW) in the nodes' dtype; part_ptr: the fp32 /
    fp64 scratch of partial node gradients (may be gx_ptr itself); wpart_ptr:
    row pid of the [NPROG, HD*C + 2*HD] weight-gradient partial sums.
    """
    pid = tl.program_id(0)
    slope = tl.cast(slope_hi, CDT) + tl.cast(slope_lo, CDT)
    w1c, w1d, b1, w2 = _load_weights(w1_ptr, b1_ptr, w2_ptr, C, HD, HD_PAD, C_PAD, CDT, DOT_DT)
    w1t = tl.trans(w1d)  # [C_PAD, HD_PAD] for dd = w1^T dz

    dw1 = tl.zeros([HD_PAD, C_PAD], dtype=CDT)
    db1 = tl.zeros([HD_PAD], dtype=CDT)
    dw2 = tl.zeros([HD_PAD], dtype=CDT)

    for t in range(pid, NUM_TILES, NPROG):
        bi = t // TILES
        pix0 = (t - bi * TILES) * BLOCK_PIX
        if INT64:
            bi = bi.to(tl.int64)
        offs, msk, chw, hw, pix, pix_ok = _tile_offsets(bi, pix0, C, HW, P, C_PAD, BLOCK_PIX)

        # ---- 1. recompute the scores and the adjacency
        S = _pair_scores(x_ptr, offs, msk, chw, w1c, w1d, b1, w2, slope, P, BLOCK_PIX, USE_DOT, IEEE, CDT)
        A = _adjacency(S, P, BLOCK_PIX, CDT)

        # ---- 2. ds[p, q] = A[p, q] (dA[p, q] - sum_r A[p, r] dA[p, r]),  dA[p, q] = dO_p . E_q
        # Padded pixels read dO = 0, so dA = ds = 0 there and they add exactly
        # nothing to the weight gradients below.
        DS = ()
        for p in tl.static_range(P):
            gp = _load_node(gout_ptr, offs, msk, p, chw, CDT)
            dA = ()
            rowdot = tl.zeros([BLOCK_PIX], dtype=CDT)
            for q in tl.static_range(P):
                if q == p:
                    dA = dA + (rowdot,)  # placeholder (A[p, p] = 0)
                else:
                    da = tl.sum(gp * _load_node(x_ptr, offs, msk, q, chw, CDT), axis=0)
                    rowdot += A[p * P + q] * da
                    dA = dA + (da,)
            for q in tl.static_range(P):
                if q == p:
                    DS = DS + (rowdot * 0,)  # placeholder, never read
                else:
                    DS = DS + (A[p * P + q] * (dA[q] - rowdot),)

        # ---- 3. node gradients, node-outer (see the module docstring)
        for i in tl.static_range(P):
            ei = _load_node(x_ptr, offs, msk, i, chw, CDT)
            acc = tl.zeros([C_PAD, BLOCK_PIX], dtype=CDT)
            for p in tl.static_range(P):
                if p != i:
                    acc += A[p * P + i][None, :] * _load_node(gout_ptr, offs, msk, p, chw, CDT)
            if i > 0:
                # What the pairs {k, i}, k < i, left for node i.
                acc += _load_node(part_ptr, offs, msk, i, chw, CDT)
            for j in tl.static_range(i + 1, P):
                diff = ei - _load_node(x_ptr, offs, msk, j, chw, CDT)
                d = tl.abs(diff)
                sgn = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(CDT)
                z = _hidden(d, w1c, w1d, b1, USE_DOT, IEEE, CDT)
                g = DS[i * P + j] + DS[j * P + i]  # both scores of the pair share the MLP
                dw2 += tl.sum(_leaky(z, slope) * g[None, :], axis=1)
                dz = tl.where(z > 0, 1.0, slope) * w2[:, None] * g[None, :]
                db1 += tl.sum(dz, axis=1)
                if USE_DOT:
                    dw1 += _mm(dz.to(DOT_DT), tl.trans(d.to(DOT_DT)), IEEE, CDT)
                    dd = _mm(w1t, dz.to(DOT_DT), IEEE, CDT)
                else:
                    dw1 += tl.sum(dz[:, None, :] * d[None, :, :], axis=2)
                    dd = tl.sum(w1c[:, :, None] * dz[:, None, :], axis=0)
                sdd = sgn * dd
                acc += sdd
                pj = part_ptr + offs + j * chw
                if i == 0:
                    tl.store(pj, (-sdd).to(part_ptr.dtype.element_ty), mask=msk)
                else:
                    prev = tl.load(pj, mask=msk, other=0.0).to(CDT)
                    tl.store(pj, (prev - sdd).to(part_ptr.dtype.element_ty), mask=msk)
            tl.store(gx_ptr + offs + i * chw, acc.to(gx_ptr.dtype.element_ty), mask=msk)
            # The next node reads scratch written in this iteration, maybe by other threads.
            tl.debug_barrier()

    # ---- weight-gradient partial sums of this program: [dw1 (HD*C) | db1 (HD) | dw2 (HD)]
    hh = tl.arange(0, HD_PAD)
    cc = tl.arange(0, C_PAD)
    h_ok = hh < HD
    row = wpart_ptr + pid.to(tl.int64) * (HD * C + 2 * HD)
    tl.store(row + hh[:, None] * C + cc[None, :], dw1, mask=h_ok[:, None] & (cc[None, :] < C))
    tl.store(row + HD * C + hh, db1, mask=h_ok)
    tl.store(row + HD * C + HD + hh, dw2, mask=h_ok)


# =============================================================================
# Host side
# =============================================================================

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INT32_LIMIT = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _check_dtype(t: Tensor) -> None:
    if t.device.type == "cpu":
        allowed = (torch.float32, torch.float64)
    else:
        allowed = (torch.float32, torch.float16, torch.bfloat16)
        if t.dtype == torch.float64:
            raise TypeError(
                "graph_aggregate (triton): float64 is not supported on GPU (the kernels accumulate in fp32 "
                "and feed fp32 tiles to tl.dot); use float32, or float64 on the CPU"
            )
    if t.dtype not in allowed:
        raise TypeError(
            f"graph_aggregate (triton): dtype {t.dtype} is not supported on {t.device.type}; expected one of "
            + ", ".join(str(d) for d in allowed)
        )
    if t.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("graph_aggregate (triton): CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


def _split_slope(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo fp32-representable (Triton passes floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _config(p: int, c: int, hd: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Tile sizes and the hidden-layer strategy (see the module docstring)."""
    # tl.dot when both sides are real matrices, or when the broadcast product
    # [HD_PAD, C_PAD, BLOCK_PIX] would not fit in registers; pads to >= 16 then.
    use_dot = (hd >= 16 and c >= 16) or _pow2(hd, 1) * _pow2(c, 1) > 256
    lo = 16 if use_dot else 1
    c_pad, hd_pad = _pow2(c, lo), _pow2(hd, lo)
    if device.type != "cuda":
        # Interpreter: the smallest tiles tl.dot accepts keep numpy temporaries
        # small, and the tiny test problems get tails and several tiles.
        return dict(BLOCK_PIX=16, C_PAD=c_pad, HD_PAD=hd_pad, USE_DOT=use_dot, num_warps=4, progs_per_sm=None)
    # Registers: a [C_PAD, BLOCK_PIX] tile costs C_PAD * BLOCK_PIX / (32 * num_warps)
    # registers a thread; keep it at <= 16 (a handful of tiles live at once), and
    # keep BLOCK_PIX >= 16 for tl.dot.  The per-pair score vectors (tuples of
    # [BLOCK_PIX]) grow with P^2, so fewer pixels for large P.
    block = 64 if p <= 5 else 32
    while block > 16 and c_pad * block > 16 * 32 * 4:
        block //= 2
    return dict(BLOCK_PIX=block, C_PAD=c_pad, HD_PAD=hd_pad, USE_DOT=use_dot, num_warps=4, progs_per_sm=4)


def _launch(kernel, grid, args, meta) -> None:
    kernel[grid](*args, **meta)


def _common_meta(cfg: dict, p: int, dtype: torch.dtype, int64: bool) -> dict:
    cdt = tl.float64 if dtype == torch.float64 else tl.float32
    dot_dt = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, cdt)
    return dict(
        P=p, C_PAD=cfg["C_PAD"], HD_PAD=cfg["HD_PAD"], BLOCK_PIX=cfg["BLOCK_PIX"], USE_DOT=cfg["USE_DOT"],
        IEEE=dtype in (torch.float32, torch.float64), INT64=int64, CDT=cdt, DOT_DT=dot_dt,
        num_warps=cfg["num_warps"],
    )


def graph_aggregate_forward(
    nodes: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, negative_slope: float, return_adjacency: bool
) -> tuple[Tensor, Tensor]:
    """Forward of the graph aggregation.

    nodes (b, p, c, h, w), w1 (hd, c), b1 (hd,), w2 (hd,) -> (out (b, p, c, h, w),
    adjacency (b, p, p, h, w) with a zero diagonal, or ``nodes.new_empty(0)``
    when not return_adjacency).  Outputs are contiguous, in the nodes' dtype.
    """
    _check_dtype(nodes)
    b, p, c, h, w = nodes.shape
    hd = w1.shape[0]
    hw = h * w
    out = nodes.new_empty(b, p, c, h, w)
    adj = nodes.new_empty(b, p, p, h, w) if return_adjacency else nodes.new_empty(0)
    if b * hw == 0 or (c == 0 and not return_adjacency):
        return out, adj
    x = nodes.contiguous()
    cfg = _config(p, c, hd, nodes.device, nodes.dtype)
    tiles = triton.cdiv(hw, cfg["BLOCK_PIX"])
    slope_hi, slope_lo = _split_slope(float(negative_slope))
    int64 = max(x.numel(), adj.numel()) > _INT32_LIMIT // 2
    meta = _common_meta(cfg, p, nodes.dtype, int64)
    args = (x, w1.contiguous(), b1.contiguous(), w2.contiguous(), out, adj if return_adjacency else out,
            c, hw, hd, tiles, slope_hi, slope_lo)
    _launch(_ga_fwd_kernel, (b * tiles,), args, dict(meta, STORE_ADJ=bool(return_adjacency)))
    return out, adj


def graph_aggregate_backward(
    grad_out: Tensor, nodes: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, negative_slope: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_nodes, grad_w1, grad_b1, grad_w2) of :func:`graph_aggregate_forward`'s out.

    Recomputes the scores and the adjacency; no host synchronisation.
    """
    _check_dtype(nodes)
    b, p, c, h, w = nodes.shape
    hd = w1.shape[0]
    hw = h * w
    device, dtype = nodes.device, nodes.dtype
    if b * hw * c == 0:
        # No pixels: nothing flows.  c = 0: dA = dO . E = 0, so ds = 0 and the
        # weights get nothing either.
        return (torch.zeros_like(nodes, memory_format=torch.contiguous_format), torch.zeros_like(w1),
                torch.zeros_like(b1), torch.zeros_like(w2))
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = nodes.contiguous()
    gout = grad_out.contiguous()
    grad_nodes = torch.empty(b, p, c, h, w, dtype=dtype, device=device)
    # Partial node gradients: grad_nodes itself when it is fp32 / fp64.
    part = grad_nodes if dtype == acc_dtype else torch.empty(b, p, c, h, w, dtype=acc_dtype, device=device)
    cfg = _config(p, c, hd, device, dtype)
    tiles = triton.cdiv(hw, cfg["BLOCK_PIX"])
    num_tiles = b * tiles
    if cfg["progs_per_sm"] is None:
        nprog = min(num_tiles, 3)  # interpreter: several programs, several tiles each
    else:
        nprog = min(num_tiles, cfg["progs_per_sm"] * _num_sms(device))
    wpart = torch.empty(nprog, hd * c + 2 * hd, dtype=acc_dtype, device=device)
    slope_hi, slope_lo = _split_slope(float(negative_slope))
    meta = _common_meta(cfg, p, dtype, x.numel() > _INT32_LIMIT // 2)
    args = (gout, x, w1.contiguous(), b1.contiguous(), w2.contiguous(), grad_nodes, part, wpart,
            c, hw, hd, tiles, num_tiles, nprog, slope_hi, slope_lo)
    _launch(_ga_bwd_kernel, (nprog,), args, meta)
    wsum = wpart.sum(0)
    # Separate tensors (not views of one buffer), in the weights' dtype.
    grad_w1 = wsum[: hd * c].view(hd, c).to(dtype, copy=True)
    grad_b1 = wsum[hd * c: hd * c + hd].to(dtype, copy=True)
    grad_w2 = wsum[hd * c + hd:].to(dtype, copy=True)
    return grad_nodes, grad_w1, grad_b1, grad_w2
