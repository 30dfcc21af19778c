"""Compiles the Triton kernels for a Hopper GPU (sm_90) on a machine without one, and reports per
config the registers, spills and shared memory that ptxas assigns.

    python -m megan_fast.triton.sm90_compile                 # every autotuned config of every tuned kernel
    python -m megan_fast.triton.sm90_compile --arch 100      # another compute capability
    python -m megan_fast.triton.sm90_compile --first --dtype float16   # the first config of each, one dtype

A developer's check of the config lists (tests/test_sm90_compile.py runs it in
a process of its own: the test process runs Triton under its interpreter,
which replaces the compiler).
Needs no GPU: Triton lowers to PTX and its bundled ptxas assembles it.  A config that spills
registers is slow on any GPU, one that needs more than 227 KiB of shared memory does not launch
on an H100/H200; the autotuned config lists (megan_fast/triton/) keep neither.  Shapes: MEGAN's
DCN (64 -> 64 channels, 3x3, 8 offset groups) and attention at head dim 32.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, not interpret (read by triton at import)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_PTXAS_RE = re.compile(r"Used (\d+) registers.*?")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def _jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def _ptxas() -> str:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return here if os.path.exists(here) else "ptxas"


def compile_one(kernel, values: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """values: runtime argument -> example (a dtype for a pointer, an int); constexprs: name -> value."""
    fn = _jit_fn(kernel)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            v = values[name]
            signature[name] = _TYPES[v] if isinstance(v, torch.dtype) else ("fp32" if isinstance(v, float) else "i32")
    # As Triton's launcher specialises them: pointers (16-byte aligned allocations) and ints divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (isinstance(values[name], torch.dtype)
                                            or (isinstance(values[name], int) and values[name] % 16 == 0))}
    src = ASTSource(fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        res = subprocess.run([_ptxas(), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    regs = int(_PTXAS_RE.search(res.stderr).group(1))
    spill = _SPILL_RE.search(res.stderr)
    return dict(regs=regs, spill=int(spill.group(1)) + int(spill.group(2)) if spill else 0,
                shared=compiled.metadata.shared)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dcn_cases(dtypes=DTYPES):
    from megan_fast.triton import deform_conv as tdc

    geo = dict(P=28672, C=64, H=64, W=112, Ho=64, Wo=112, Co=64, Cg=64, Cog=64, KC=576, Cpo=8, OG=8, KW=3, K=9,
               stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1, PIX_PER_SPLIT=1024)
    for dtype in dtypes:
        ptrs = {n: dtype for n in ("x_ptr", "off_ptr", "msk_ptr", "w_ptr", "bias_ptr", "out_ptr", "gout_ptr")}
        ptrs.update({n: torch.float32 for n in ("gin_ptr", "part_ptr")})
        ptrs.update({n: dtype for n in ("goff_ptr", "gmsk_ptr")})
        ieee = dtype == torch.float32
        for name, kernel, extra in (
            ("dcn forward", tdc._dcn_fwd_tuned, dict(HAS_BIAS=True, BLOCK_N=64)),
            ("dcn backward (one pass)", tdc._dcn_bwd_one_pass_tuned, dict(DIRECT=True, BLOCK_N=64)),
        ):
            for cfg in kernel.configs:
                const = dict(HAS_MASK=True, IEEE=ieee, CDT=triton.language.float32, INT64=False, **extra,
                             **cfg.kwargs)
                const["CHUNK"] = min(8, cfg.kwargs["BLOCK_K"])
                fn = _jit_fn(kernel)
                const = {k: v for k, v in const.items() if k in fn.arg_names}
                yield name, dtype, cfg, kernel, {**geo, **ptrs}, const


def _attention_cases(dtypes=DTYPES):
    from megan_fast.triton import nonlocal_attention as tna

    for dtype in dtypes:
        for name, kernel in (("attention dq (computes D)", tna._nla_bwd_dq_tuned),
                             ("attention dkdv", tna._nla_bwd_dkdv_tuned),
                             ("attention forward", tna._nla_fwd_tuned)):
            fn = _jit_fn(kernel)
            values = {n: (dtype if n.endswith("_ptr") else 1) for n in fn.arg_names}
            for n in ("lse_ptr", "delta_ptr"):
                if n in values:
                    values[n] = torch.float32
            for n in ("qk_scale_hi", "qk_scale_lo", "scale_hi", "scale_lo"):
                if n in values:
                    values[n] = 0.5
            prune = getattr(kernel, "early_config_prune", None)
            configs = prune(kernel.configs, {}, IEEE=dtype == torch.float32) if prune else kernel.configs
            for cfg in configs:
                const = dict(D=32, DV=32, BLOCK_D=32, BLOCK_DV=32, IEEE=dtype == torch.float32,
                             CDT=triton.language.float32, INT64=False, **cfg.kwargs)
                const = {k: v for k, v in const.items() if k in fn.arg_names}
                yield name, dtype, cfg, kernel, values, const


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--first", action="store_true", help="only the first config of each kernel")
    ap.add_argument("--dtype", choices=[str(d)[6:] for d in DTYPES], help="only this dtype")
    args = ap.parse_args(argv)
    dtypes = DTYPES if args.dtype is None else (getattr(torch, args.dtype),)
    print("| kernel | dtype | config | registers | spill bytes | shared (KiB) |")
    print("|---|---|---|---|---|---|")
    bad = 0
    seen = set()
    for name, dtype, cfg, kernel, values, const in (*_dcn_cases(dtypes), *_attention_cases(dtypes)):
        if args.first and (name, dtype) in seen:
            continue
        seen.add((name, dtype))
        r = compile_one(kernel, values, const, cfg.num_warps, cfg.num_stages, args.arch)
        bad += r["spill"] > 0 or r["shared"] > 227 * 1024
        desc = ", ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f", warps={cfg.num_warps}, stages={cfg.num_stages}"
        print(f"| {name} | {str(dtype)[6:]} | {desc} | {r['regs']} | {r['spill']} | {r['shared'] / 1024:.1f} |",
              flush=True)
    print(f"\n{bad} config(s) spill or exceed 227 KiB of shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
