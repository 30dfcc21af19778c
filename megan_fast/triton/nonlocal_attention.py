"""Triton kernels of the fused dot-product ("non-local") attention.

    out = softmax(scale * q @ k^T, dim=-1) @ v,    lse = logsumexp(scale * q @ k^T, dim=-1)

for q (B, N, D), k (B, M, D), v (B, M, DV) -> out (B, N, DV), lse (B, N).
Layout of the file (as in Liger-Kernel's ops files): private ``@triton.jit``
helpers and kernels first, then the host launchers
:func:`nonlocal_attention_forward` and :func:`nonlocal_attention_backward`.
Nothing is registered with ``torch.library`` here;
``megan_fast.ops.nonlocal_attention`` wires the launchers into the op.

Design (flash-attention-2 style; memory O(N + M), the N x M matrix never exists)
--------------------------------------------------------------------------------
Forward, one program per (query block, batch), grid (cdiv(N, BLOCK_Q), B).
The program keeps its [BLOCK_Q, D] query tile in registers and walks over the
keys in blocks of BLOCK_KV with an *online softmax*: for every row it keeps
the running maximum m, the running denominator l = sum_j exp(s_j - m) and the
running numerator acc = sum_j exp(s_j - m) v_j.  When a new block raises the
maximum to m', the old sums are rescaled by alpha = exp(m - m'), so nothing
ever overflows and every exponent is <= 0.  At the end out = acc / l and
lse = m + log(l).

All exponentials are base 2 (``exp2`` is the native instruction; ``exp`` is
exp2 plus a multiply): the logits are computed directly in log2 units,
s2 = (q . k) * scale * log2(e), with log2(e) folded into the scale on the
host, and exp(s - m) = exp2(s2 - m2).  lse is converted back to natural log
units (times ln 2) only once, in the epilogue.

Backward (recomputation from lse, no N x M storage either):

    P   = exp(scale q k^T - lse)          (recomputed block by block)
    D_i = rowsum(dO_i * O_i)              (= sum_j P_ij dP_ij, the softmax Jacobian term)
    dV  = P^T dO
    dP  = dO V^T
    dS  = P * (dP - D)                    (gradient w.r.t. the scaled logits)
    dQ  = scale * dS K
    dK  = scale * dS^T Q

* ``_nla_bwd_dq_kernel``, grid (cdiv(N, BLOCK_Q), B), launched first: one
  program owns a query block, keeps Q, dO, lse, D, dQ and loops over all key
  blocks.  It computes D of its rows from the dO tile it holds anyway (and
  the O tile) and stores it for the next kernel: no launch of its own for D.
* ``_nla_bwd_dkdv_kernel``, grid (cdiv(M, BLOCK_KV), B), launched after it:
  one program owns a key block, keeps K, V, dK, dV for it in registers and
  loops over all query blocks, reading D.  It works on the transposed tiles
  (P^T, dP^T, dS^T, [BLOCK_KV, BLOCK_Q]) so that both products dV += P^T dO
  and dK += dS^T Q are plain tl.dot's of a register tile with a loaded one.
Every output element is written by exactly one program: no atomics, no
zero-initialised accumulation buffers, deterministic results.  The price is
that P (and dP) are recomputed twice in the backward, once per kernel; with
MEGAN's head dim (32) the kernels are bound by the exponentials and the
element-wise work, not by memory, and the atomic alternative (one kernel,
dQ accumulated with fp32 atomics) would be non-deterministic.

Masks and tails
---------------
* Head dims D and DV are constexpr and padded to BLOCK_D / BLOCK_DV (next
  power of two, at least 16: the smallest tl.dot operand).  The padded
  columns are loaded as 0, so they add 0 to every dot product, and are never
  stored.  When D == BLOCK_D the column mask is compiled away.
* Key tails: the loops run over the full blocks without any row mask and
  handle the last, partial block (if any) in a separate call of the same step
  function with MASK_* = True.  A masked key gets the logit -inf in the
  forward, hence exp2(-inf) = 0 exactly, and p = 0 in the dQ kernel: its
  contribution is exactly zero (a 0-loaded key alone would give the logit 0,
  not -inf).  For MEGAN's sizes (multiples of 64) the tail code is never
  executed.
* Query tails: masked query rows are loaded as 0 and read lse = +inf, so
  their P is exp2(finite - inf) = 0 and they add exactly zero to dK and dV.
* Rows without keys (M = 0): the loop does not run, m = -inf, l = 0; the
  epilogue gives out = 0 and lse = -inf (no 0/0).  A backward row with
  lse = -inf is treated like a masked one (P = 0) instead of producing
  exp2(+inf) * 0 = NaN.
* Numerical stability: m is the running max of the logits, so every
  exponent in the forward is <= 0; in the backward s2 - lse2 <= 0 up to
  rounding since lse >= every logit of its row.  Logits of +-1000 (or more)
  are fine.

Precision (the table in megan_fast/triton/_utils.py, one for the four ops):
accumulation in fp32 (fp64 for fp64 inputs, interpreter only); fp32 tiles
are exact IEEE products unless the user allowed TF32, fp64 tiles always;
fp16/bf16 tiles are fed to ``tl.dot`` in their own type with fp32
accumulation, P and dS being rounded to that type before their products, as
every flash-attention kernel does.  Triton passes Python float
arguments as fp32, which would limit the scale to 24 bits: the launchers
split every scale into an fp32 pair hi + lo and the kernels add them in the
compute type (about 48 bits, plenty for fp64 checks).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from megan_fast.triton._utils import dot, expect, launch, num_sms, precision, runnable, strided_needs_int64

__all__ = ["nonlocal_attention_forward", "nonlocal_attention_backward"]

_LOG2E = 1.4426950408889634  # log2(e)


# =============================================================================
# JIT helpers
# =============================================================================


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile; out-of-range elements read 0.  Only the masks that can be
    false are emitted (a full tile with an exact head dim is an unmasked load)."""
    if MASK_ROWS:
        if MASK_COLS:
            t = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            t = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            t = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _store_tile(ptrs, val, row_ok, col_ok, MASK_COLS: tl.constexpr):
    """Store a 2-D tile in ptrs' element type; rows are always masked (stores are
    outside the loops, the mask costs nothing that matters)."""
    val = val.to(ptrs.dtype.element_ty)
    if MASK_COLS:
        tl.store(ptrs, val, mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(ptrs, val, mask=row_ok[:, None])


@triton.jit
def _widen(hi, lo, CDT: tl.constexpr):
    """hi + lo in the compute type (see the module docstring: fp32 kernel args)."""
    return tl.cast(hi, CDT) + tl.cast(lo, CDT)


@triton.jit
def _lse_log2(lse_ptrs, row_ok, MASK_ROWS: tl.constexpr, CDT: tl.constexpr):
    """Row log-sum-exp in log2 units.  Masked rows and rows without keys
    (lse = -inf) become +inf, so that P = exp2(s2 - lse2) = 0 for them."""
    if MASK_ROWS:
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf")).to(CDT)
    else:
        lse = tl.load(lse_ptrs).to(CDT)
    lse2 = lse * 1.4426950408889634
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def _load_rows(ptrs, row_ok, MASK_ROWS: tl.constexpr, CDT: tl.constexpr):
    if MASK_ROWS:
        r = tl.load(ptrs, mask=row_ok, other=0.0).to(CDT)
    else:
        r = tl.load(ptrs).to(CDT)
    return r


# =============================================================================
# Forward
# =============================================================================


@triton.jit
def _nla_fwd_step(
    acc, m_i, l_i, q, k_base, v_base, start, M,
    offs_kv, offs_d, offs_dv, d_ok, dv_ok,
    stride_km, stride_kd, stride_vm, stride_vd, qk_scale,
    MASK_KV: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr, IEEE: tl.constexpr,
):
    """One key block [start, start + BLOCK_KV) of the online softmax.

    m_i: running row max of s2 (log2 units), l_i: running sum of exp2(s2 - m_i),
    acc: running sum of exp2(s2 - m_i) * v.  Returns the updated triple.
    """
    rows = start + offs_kv
    kv_ok = rows < M
    # K^T tile [BLOCK_D, BLOCK_KV], loaded transposed (strides do the transpose).
    kt = _load_tile(k_base + offs_d[:, None] * stride_kd + rows[None, :] * stride_km,
                    d_ok, kv_ok, MASK_D, MASK_KV)
    # Logits in log2 units.  The scale multiplies the product (as torch does)
    # rather than q, and the max is taken after scaling: correct for scale < 0.
    s = dot(q, kt, None, IEEE) * qk_scale
    if MASK_KV:
        s = tl.where(kv_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose logits so far are all -inf keeps m = -inf; subtracting 0
    # instead keeps exp2(-inf - (-inf)) = NaN out (p and alpha are then 0).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)  # rescales the old sums to the new max; 0 on the first block
    p = tl.exp2(s - m_sub[:, None])  # every exponent <= 0: no overflow whatever the logits
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_base + rows[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
                   kv_ok, dv_ok, MASK_KV, MASK_DV)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, m_new, l_i


@triton.jit
def _nla_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    N, M,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    stride_ob, stride_on, stride_od,
    stride_lb, stride_ln,
    qk_scale_hi, qk_scale_lo,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr, INT64: tl.constexpr,
):
    """out / lse rows [pid_q * BLOCK_Q, +BLOCK_Q) of batch pid_b.

    grid = (cdiv(N, BLOCK_Q), B).
    """
    MASK_D: tl.constexpr = D < BLOCK_D
    MASK_DV: tl.constexpr = DV < BLOCK_DV
    pid_q = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # batch offsets in int64: B * N * D may exceed 2^31
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_kv = tl.arange(0, BLOCK_KV)
    if INT64:
        offs_q = offs_q.to(tl.int64)
        offs_kv = offs_kv.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < N
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    qk_scale = _widen(qk_scale_hi, qk_scale_lo, CDT)  # scale * log2(e)

    q = _load_tile(q_ptr + pid_b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   q_ok, d_ok, True, MASK_D)
    k_base = k_ptr + pid_b * stride_kb
    v_base = v_ptr + pid_b * stride_vb

    m_i = tl.full([BLOCK_Q], float("-inf"), CDT)
    l_i = tl.zeros([BLOCK_Q], CDT)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], CDT)
    # Full key blocks without row masks, then the partial tail block with them.
    m_full = (M // BLOCK_KV) * BLOCK_KV
    for start in range(0, m_full, BLOCK_KV):
        acc, m_i, l_i = _nla_fwd_step(
            acc, m_i, l_i, q, k_base, v_base, start, M, offs_kv, offs_d, offs_dv, d_ok, dv_ok,
            stride_km, stride_kd, stride_vm, stride_vd, qk_scale, False, MASK_D, MASK_DV, IEEE,
        )
    if m_full < M:
        acc, m_i, l_i = _nla_fwd_step(
            acc, m_i, l_i, q, k_base, v_base, m_full, M, offs_kv, offs_d, offs_dv, d_ok, dv_ok,
            stride_km, stride_kd, stride_vm, stride_vd, qk_scale, True, MASK_D, MASK_DV, IEEE,
        )

    # Epilogue.  l > 0 for every row with at least one key (the max term
    # contributes exp2(0) = 1); l = 0 only when M = 0: out = 0, lse = -inf.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # * ln 2
    _store_tile(o_ptr + pid_b * stride_ob + offs_q[:, None] * stride_on + offs_dv[None, :] * stride_od,
                out, q_ok, dv_ok, MASK_DV)
    tl.store(lse_ptr + pid_b * stride_lb + offs_q * stride_ln, lse.to(lse_ptr.dtype.element_ty), mask=q_ok)


# =============================================================================
# Backward
# =============================================================================


@triton.jit
def _nla_bwd_dkdv_step(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start, N,
    offs_q, offs_d, offs_dv, d_ok, dv_ok,
    stride_qn, stride_qd, stride_don, stride_dod, stride_ln, qk_scale,
    MASK_Q: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr,
):
    """Contribution of query block [start, start + BLOCK_Q) to dK and dV (transposed tiles)."""
    rows = start + offs_q
    q_ok = rows < N
    q = _load_tile(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, q_ok, d_ok, MASK_Q, MASK_D)
    do = _load_tile(do_base + rows[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                    q_ok, dv_ok, MASK_Q, MASK_DV)
    lse2 = _lse_log2(lse_base + rows * stride_ln, q_ok, MASK_Q, CDT)
    delta = _load_rows(delta_base + rows, q_ok, MASK_Q, CDT)
    # P^T [BLOCK_KV, BLOCK_Q].  Masked query rows (lse2 = +inf) give 0 exactly.
    # Key rows past M (tail program) hold garbage, but every row of dK / dV
    # depends on its own row of P^T / dS^T only, and those rows are not stored.
    pt = tl.exp2(dot(k, tl.trans(q), None, IEEE) * qk_scale - lse2[None, :])
    dv = dot(pt.to(do.dtype), do, dv, IEEE)  # dV += P^T dO
    dpt = dot(v, tl.trans(do), None, IEEE)  # dP^T = V dO^T
    dst = pt * (dpt - delta[None, :])  # dS^T
    dk = dot(dst.to(q.dtype), q, dk, IEEE)  # dK += dS^T Q (times scale at the end)
    return dk, dv


@triton.jit
def _nla_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N, M,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    stride_dob, stride_don, stride_dod,
    stride_lb, stride_ln,
    stride_dkb, stride_dkm, stride_dkd,
    stride_dvb, stride_dvm, stride_dvd,
    qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr, INT64: tl.constexpr,
):
    """dK / dV rows [pid_kv * BLOCK_KV, +BLOCK_KV) of batch pid_b, over all queries.

    grid = (cdiv(M, BLOCK_KV), B).
    """
    MASK_D: tl.constexpr = D < BLOCK_D
    MASK_DV: tl.constexpr = DV < BLOCK_DV
    pid_kv = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_kv = pid_kv * BLOCK_KV + tl.arange(0, BLOCK_KV)
    offs_q = tl.arange(0, BLOCK_Q)
    if INT64:
        offs_kv = offs_kv.to(tl.int64)
        offs_q = offs_q.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_ok = offs_kv < M
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    qk_scale = _widen(qk_scale_hi, qk_scale_lo, CDT)
    scale = _widen(scale_hi, scale_lo, CDT)

    k = _load_tile(k_ptr + pid_b * stride_kb + offs_kv[:, None] * stride_km + offs_d[None, :] * stride_kd,
                   kv_ok, d_ok, True, MASK_D)
    v = _load_tile(v_ptr + pid_b * stride_vb + offs_kv[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
                   kv_ok, dv_ok, True, MASK_DV)
    q_base = q_ptr + pid_b * stride_qb
    do_base = do_ptr + pid_b * stride_dob
    lse_base = lse_ptr + pid_b * stride_lb
    delta_base = delta_ptr + pid_b * N

    dk = tl.zeros([BLOCK_KV, BLOCK_D], CDT)
    dv = tl.zeros([BLOCK_KV, BLOCK_DV], CDT)
    n_full = (N // BLOCK_Q) * BLOCK_Q
    for start in range(0, n_full, BLOCK_Q):
        dk, dv = _nla_bwd_dkdv_step(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, start, N, offs_q, offs_d, offs_dv, d_ok, dv_ok,
            stride_qn, stride_qd, stride_don, stride_dod, stride_ln, qk_scale, False, MASK_D, MASK_DV, IEEE, CDT,
        )
    if n_full < N:
        dk, dv = _nla_bwd_dkdv_step(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, n_full, N, offs_q, offs_d, offs_dv, d_ok, dv_ok,
            stride_qn, stride_qd, stride_don, stride_dod, stride_ln, qk_scale, True, MASK_D, MASK_DV, IEEE, CDT,
        )

    _store_tile(dk_ptr + pid_b * stride_dkb + offs_kv[:, None] * stride_dkm + offs_d[None, :] * stride_dkd,
                dk * scale, kv_ok, d_ok, MASK_D)
    _store_tile(dv_ptr + pid_b * stride_dvb + offs_kv[:, None] * stride_dvm + offs_dv[None, :] * stride_dvd,
                dv, kv_ok, dv_ok, MASK_DV)


@triton.jit
def _nla_bwd_dq_step(
    dq, q, do, lse2, delta, k_base, v_base, start, M,
    offs_kv, offs_d, offs_dv, d_ok, dv_ok,
    stride_km, stride_kd, stride_vm, stride_vd, qk_scale,
    MASK_KV: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr, IEEE: tl.constexpr,
):
    """Contribution of key block [start, start + BLOCK_KV) to dQ."""
    rows = start + offs_kv
    kv_ok = rows < M
    k = _load_tile(k_base + rows[:, None] * stride_km + offs_d[None, :] * stride_kd, kv_ok, d_ok, MASK_KV, MASK_D)
    # V^T tile [BLOCK_DV, BLOCK_KV], loaded transposed.
    vt = _load_tile(v_base + offs_dv[:, None] * stride_vd + rows[None, :] * stride_vm, dv_ok, kv_ok, MASK_DV, MASK_KV)
    p = tl.exp2(dot(q, tl.trans(k), None, IEEE) * qk_scale - lse2[:, None])
    if MASK_KV:
        # A 0-loaded key has logit 0, and exp2(0 - lse2) can even be inf for very
        # negative logits: force p = 0 so that the product with the 0 key row is 0.
        p = tl.where(kv_ok[None, :], p, 0.0)
    dp = dot(do, vt, None, IEEE)  # dP = dO V^T
    ds = p * (dp - delta[:, None])
    dq = dot(ds.to(k.dtype), k, dq, IEEE)  # dQ += dS K (times scale at the end)
    return dq


@triton.jit
def _nla_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, o_ptr,
    N, M,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_km, stride_kd,
    stride_vb, stride_vm, stride_vd,
    stride_dob, stride_don, stride_dod,
    stride_lb, stride_ln,
    stride_dqb, stride_dqn, stride_dqd,
    stride_ob, stride_on, stride_od,
    qk_scale_hi, qk_scale_lo, scale_hi, scale_lo,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, CDT: tl.constexpr, INT64: tl.constexpr,
):
    """dQ rows [pid_q * BLOCK_Q, +BLOCK_Q) of batch pid_b, over all keys (M = 0: dQ = 0).

    grid = (cdiv(N, BLOCK_Q), B).  The program also computes D = rowsum(dO * O)
    of its rows from the dO tile it holds anyway and stores it for the dK/dV
    kernel, launched after it.
    """
    MASK_D: tl.constexpr = D < BLOCK_D
    MASK_DV: tl.constexpr = DV < BLOCK_DV
    pid_q = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_kv = tl.arange(0, BLOCK_KV)
    if INT64:
        offs_q = offs_q.to(tl.int64)
        offs_kv = offs_kv.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_q < N
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    qk_scale = _widen(qk_scale_hi, qk_scale_lo, CDT)
    scale = _widen(scale_hi, scale_lo, CDT)

    q = _load_tile(q_ptr + pid_b * stride_qb + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   q_ok, d_ok, True, MASK_D)
    do = _load_tile(do_ptr + pid_b * stride_dob + offs_q[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                    q_ok, dv_ok, True, MASK_DV)
    # Masked query rows: lse2 = +inf -> p = 0 (their dQ rows are not stored anyway).
    lse2 = _lse_log2(lse_ptr + pid_b * stride_lb + offs_q * stride_ln, q_ok, True, CDT)
    o = _load_tile(o_ptr + pid_b * stride_ob + offs_q[:, None] * stride_on + offs_dv[None, :] * stride_od,
                   q_ok, dv_ok, True, MASK_DV)
    delta = tl.sum(o.to(CDT) * do.to(CDT), 1)
    tl.store(delta_ptr + pid_b * N + offs_q, delta, mask=q_ok)
    k_base = k_ptr + pid_b * stride_kb
    v_base = v_ptr + pid_b * stride_vb

    dq = tl.zeros([BLOCK_Q, BLOCK_D], CDT)
    m_full = (M // BLOCK_KV) * BLOCK_KV
    for start in range(0, m_full, BLOCK_KV):
        dq = _nla_bwd_dq_step(
            dq, q, do, lse2, delta, k_base, v_base, start, M, offs_kv, offs_d, offs_dv, d_ok, dv_ok,
            stride_km, stride_kd, stride_vm, stride_vd, qk_scale, False, MASK_D, MASK_DV, IEEE,
        )
    if m_full < M:
        dq = _nla_bwd_dq_step(
            dq, q, do, lse2, delta, k_base, v_base, m_full, M, offs_kv, offs_d, offs_dv, d_ok, dv_ok,
            stride_km, stride_kd, stride_vm, stride_vd, qk_scale, True, MASK_D, MASK_DV, IEEE,
        )

    _store_tile(dq_ptr + pid_b * stride_dqb + offs_q[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                dq * scale, q_ok, d_ok, MASK_D)


# ---- autotuned entry points (CUDA)
#
# Candidate blocks for head dims up to 64 (MEGAN: 32), fp16/bf16 and fp32 (exact
# or TF32 products) alike: the autotuner times each on the first call of a new
# (N, M, D, DV, IEEE, dtype) and keeps the fastest.  Each list holds the
# hand-picked blocks measured on an H100 (docs/PERFORMANCE.md); at d = 32 none of the fp16/bf16
# tiles spills registers for sm_90 (python -m megan_fast.triton.sm90_compile).  Warm up outside timed and captured
# regions: the first call of a new size benchmarks every config.
_TUNE_KEY = ["N", "M", "D", "DV", "IEEE"]
# Exact fp32 products (Triton's IEEE fp32 dot) need far more registers than
# tensor-core ones: on sm_90 they spill in every tile above 32 x 32 (and in the
# dq / dkdv 32 x 32 ones), so exact fp32 is tuned over its own small tiles.
_EXACT_AREA = 1024


def _configs(tiles) -> list:
    """triton.Config for every (BLOCK_Q, BLOCK_KV, num_warps, num_stages)."""
    return [triton.Config(dict(BLOCK_Q=bq, BLOCK_KV=bkv), num_warps=nw, num_stages=ns) for bq, bkv, nw, ns in tiles]


def _prune(configs, named_args, **kwargs):
    """Exact fp32 (IEEE) keeps the small tiles, tensor-core products the others."""
    exact = bool(kwargs.get("IEEE"))
    return [c for c in configs if (c.kwargs["BLOCK_Q"] * c.kwargs["BLOCK_KV"] <= _EXACT_AREA) == exact]


def _tune(tiles):
    return triton.autotune(_configs(tiles), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})


_nla_fwd_tuned = _tune([
    (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 32, 4, 2), (64, 128, 4, 2),
    (32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2),
])(_nla_fwd_kernel)
_nla_bwd_dq_tuned = _tune([
    (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2),
    (32, 16, 4, 2), (16, 32, 4, 2),
])(_nla_bwd_dq_kernel)
_nla_bwd_dkdv_tuned = _tune([
    (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 3), (32, 128, 4, 2),
    (32, 16, 4, 2), (16, 32, 4, 2),
])(_nla_bwd_dkdv_kernel)


def _tuned(device: torch.device, d_block: int) -> bool:
    """Whether the autotuned entry points run: on CUDA, for padded head dims up to 64 (the lists' range)."""
    return device.type == "cuda" and d_block <= 64


# =============================================================================
# Host side
# =============================================================================



def _expect_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    """What the kernels rely on (the public op checks and explains): 3-D, one dtype and device, matching sizes."""
    expect(q.dim() == k.dim() == v.dim() == 3, "nonlocal_attention: q, k, v must be 3-D")
    expect(q.dtype == k.dtype == v.dtype and q.device == k.device == v.device,
           "nonlocal_attention: q, k, v must share one dtype and device")
    expect(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and v.shape[:2] == k.shape[:2],
           f"nonlocal_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")


def _split_f32(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo exactly representable in fp32 (Triton's float argument type)."""
    x = float(x)
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]  # round to fp32, in pure Python
        lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    except OverflowError:  # |x| beyond fp32: the kernel sees inf either way
        return x, 0.0
    if not math.isfinite(x - hi):
        return x, 0.0
    return hi, lo


def _head_block(d: int) -> int:
    """Padded head dim: next power of two, at least 16 (the smallest tl.dot extent)."""
    return max(16, triton.next_power_of_2(max(d, 1)))


# Fixed block configurations.  CPU (interpreter): tiny tiles, so that the small
# test problems span several blocks (online-softmax rescaling, tails) and numpy
# temporaries stay small.  CUDA: the blocks measured on an H100 for MEGAN's head
# dim 32 (docs/PERFORMANCE.md, "Kernels vs their peers"), for head dims above 64
# (the autotuned lists above cover d <= 64).  The launchers refuse float64 on a
# GPU (megan_fast/triton/_utils.runnable): no GPU block is sized for it.
_CPU_CFG = dict(BLOCK_Q=16, BLOCK_KV=16, num_warps=4, num_stages=1)


def _fill(rows: int, block: int, b: int, device: torch.device) -> int:
    """block, halved (down to 64) while the grid (cdiv(rows, block), b) has fewer
    programs than the GPU has SMs: n = 1024 with a batch of 1 would otherwise
    run 8 programs of 128 rows on a 132-SM H100."""
    while block > 64 and triton.cdiv(rows, block) * b < num_sms(device):
        block //= 2
    return block


def _fwd_config(device: torch.device, dtype: torch.dtype, bd: int, bdv: int, b: int, n: int) -> dict:
    if device.type != "cuda":
        return dict(_CPU_CFG)
    if dtype == torch.float32:  # exact fp32 products need small tiles
        return dict(BLOCK_Q=64, BLOCK_KV=32, num_warps=4, num_stages=2)
    if max(bd, bdv) <= 128:
        return dict(BLOCK_Q=_fill(n, 128, b, device), BLOCK_KV=64, num_warps=8, num_stages=2)
    return dict(BLOCK_Q=64, BLOCK_KV=32, num_warps=8, num_stages=2)


def _bwd_config(device: torch.device, dtype: torch.dtype, bd: int, bdv: int) -> dict:
    """Blocks of both backward kernels: dkdv owns BLOCK_KV keys and loops over
    BLOCK_Q queries; dq the other way round (its own BLOCK_Q_DQ / BLOCK_KV_DQ)."""
    if device.type != "cuda":
        return dict(_CPU_CFG, BLOCK_Q_DQ=16, BLOCK_KV_DQ=16)
    wide = dtype != torch.float32 and max(bd, bdv) > 128
    return dict(BLOCK_Q=32, BLOCK_KV=64, BLOCK_Q_DQ=64, BLOCK_KV_DQ=32, num_warps=8 if wide else 4, num_stages=2)


def nonlocal_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse): out = softmax(scale q k^T) v (b, n, dv) in q's dtype, lse (b, n) the row
    log-sum-exp of scale q k^T in float32 (float64 for float64 inputs); m = 0 gives
    out = 0 and lse = -inf.  Inputs may have any strides."""
    runnable(q, "nonlocal_attention")
    _expect_shapes(q, k, v)
    b, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    device, dtype = q.device, q.dtype
    out = q.new_empty(b, n, dv)
    prec = precision(dtype, device)
    lse = q.new_empty(b, n, dtype=prec.accumulate)
    if b == 0 or n == 0:
        return out, lse
    bd, bdv = _head_block(d), _head_block(dv)
    qk_hi, qk_lo = _split_f32(float(scale) * _LOG2E)
    args = (
        q, k, v, out, lse, n, m,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        qk_hi, qk_lo,
    )
    meta = dict(D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, IEEE=prec.ieee, CDT=prec.compute,
                INT64=strided_needs_int64(q, k, v, out))
    if _tuned(device, max(bd, bdv)):
        grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_Q"]), b)  # noqa: E731
        launch(_nla_fwd_tuned, grid, args, meta, "nonlocal_attention", dtype, device)
        return out, lse
    cfg = _fwd_config(device, dtype, bd, bdv, b, n)
    meta.update(BLOCK_Q=cfg["BLOCK_Q"], BLOCK_KV=cfg["BLOCK_KV"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    launch(_nla_fwd_kernel, (triton.cdiv(n, cfg["BLOCK_Q"]), b), args, meta, "nonlocal_attention", dtype, device)
    return out, lse


def nonlocal_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v) of :func:`nonlocal_attention_forward`, from its saved out and lse.

    The gradients are contiguous, in the dtype of q, k, v (as the C++ kernels' and the fake kernel's).
    """
    _expect_shapes(q, k, v)
    runnable(q, "nonlocal_attention")
    b, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    device, dtype = q.device, q.dtype
    grad_q, grad_k, grad_v = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if b == 0:
        return grad_q, grad_k, grad_v
    if n == 0:  # no queries: nothing flows into k and v
        return grad_q, grad_k.zero_(), grad_v.zero_()
    if grad_out.dtype != dtype:
        grad_out = grad_out.to(dtype)
    bd, bdv = _head_block(d), _head_block(dv)
    prec = precision(dtype, device)
    int64 = strided_needs_int64(q, k, v, grad_out, out)
    qk_hi, qk_lo = _split_f32(float(scale) * _LOG2E)
    s_hi, s_lo = _split_f32(float(scale))
    common = dict(D=d, DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, IEEE=prec.ieee, CDT=prec.compute, INT64=int64)
    delta = torch.empty(b, n, dtype=prec.accumulate, device=device)
    head = (q, k, v, grad_out, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride())
    dkdv_args = (*head, grad_k, grad_v, n, m, *strides, *grad_k.stride(), *grad_v.stride(), qk_hi, qk_lo, s_hi, s_lo)
    dq_args = (*head, grad_q, out, n, m, *strides, *grad_q.stride(), *out.stride(), qk_hi, qk_lo, s_hi, s_lo)

    # dQ first: it also writes D = rowsum(dO * O), which the dK / dV kernel reads.
    if _tuned(device, max(bd, bdv)):
        launch(_nla_bwd_dq_tuned, lambda cfg: (triton.cdiv(n, cfg["BLOCK_Q"]), b), dq_args, common,
               "nonlocal_attention", dtype, device)
        if m > 0:
            launch(_nla_bwd_dkdv_tuned, lambda cfg: (triton.cdiv(m, cfg["BLOCK_KV"]), b), dkdv_args, common,
                   "nonlocal_attention", dtype, device)
        return grad_q, grad_k, grad_v
    cfg = _bwd_config(device, dtype, bd, bdv)
    common.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    launch(_nla_bwd_dq_kernel, (triton.cdiv(n, cfg["BLOCK_Q_DQ"]), b), dq_args,
           dict(common, BLOCK_Q=cfg["BLOCK_Q_DQ"], BLOCK_KV=cfg["BLOCK_KV_DQ"]), "nonlocal_attention", dtype, device)
    if m > 0:
        launch(_nla_bwd_dkdv_kernel, (triton.cdiv(m, cfg["BLOCK_KV"]), b), dkdv_args,
               dict(common, BLOCK_Q=cfg["BLOCK_Q"], BLOCK_KV=cfg["BLOCK_KV"]), "nonlocal_attention", dtype, device)
    return grad_q, grad_k, grad_v
