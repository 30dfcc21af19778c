"""Every config the autotuner may pick (megan_fast/triton/, CUDA) gives the right
result: each is run alone (an autotuner with one config does not benchmark, so it also runs under the
interpreter) through the launchers' tuned path, against torchvision / the explicit formula in float64.
The invariants the launchers rely on are checked on the config lists themselves."""

from __future__ import annotations

import pytest
import torch

from _triton_util import DEVICE, skip_module_without_triton  # noqa: E402

skip_module_without_triton()

from megan_fast.triton import deform_conv as tdc  # noqa: E402
from megan_fast.triton import nonlocal_attention as tna  # noqa: E402

torchvision = pytest.importorskip("torchvision")

from test_deform_conv import CASES, assert_matches_torchvision, problem as dcn_problem  # noqa: E402
from test_nonlocal_attention_triton import NAMES, TOL, expected, problem, triton_all  # noqa: E402


def _only(monkeypatch, tuner, config):
    monkeypatch.setattr(tuner, "configs", [config])
    tuner.cache.clear()


def test_dcn_config_invariants():
    # every buffer the one-pass backward accumulates into with atomics is zeroed before each timed run
    assert sorted(tdc._dcn_bwd_one_pass_tuned.reset_to_zero) == ["gin_ptr", "gmsk_ptr", "goff_ptr"]
    for c in tdc._dcn_bwd_one_pass_tuned.configs:
        # splits are runs of _SPLIT_PIXELS pixels: whole tiles; DIRECT assumes BLOCK_K >= 16
        assert tdc._SPLIT_PIXELS % c.kwargs["BLOCK_P"] == 0 and c.kwargs["BLOCK_K"] >= 16, c
    for c in tdc._dcn_fwd_tuned.configs:
        assert c.kwargs["BLOCK_K"] >= 16, c


@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("case", ["basic", "groups2", "batch1-c16"])
def test_every_dcn_config(monkeypatch, which, case):
    monkeypatch.setattr(tdc, "_tuned", lambda device: True)
    tuner, other = tdc._dcn_fwd_tuned, tdc._dcn_bwd_one_pass_tuned
    if which == "backward":
        tuner, other = other, tuner
    _only(monkeypatch, other, other.configs[0])  # each pass runs both kernels: the other one pinned
    for config in list(tuner.configs):
        _only(monkeypatch, tuner, config)
        assert_matches_torchvision("triton", dcn_problem("triton", **CASES[case]))


@pytest.mark.parametrize("case", ["basic", "groups2"])
def test_dcn_splits_as_on_a_132_sm_gpu(monkeypatch, case):
    # With a GPU's SM count the one-pass backward cuts the pixels into many splits of whole tiles:
    # every tile must be processed by exactly one split (a gap or an overlap breaks every gradient).
    monkeypatch.setattr(tdc, "_tuned", lambda device: True)
    monkeypatch.setattr(tdc, "num_sms", lambda device: 132)
    splits = []
    real = tdc.launch

    def record(kernel, grid, args, meta, *rest):
        if kernel is tdc._dcn_bwd_one_pass_tuned:
            splits.append(grid(dict(BLOCK_K=16))[0])
        return real(kernel, grid, args, meta, *rest)

    monkeypatch.setattr(tdc, "launch", record)
    for config in [c for c in tdc._dcn_bwd_one_pass_tuned.configs if c.num_stages == 1][:2]:
        _only(monkeypatch, tdc._dcn_bwd_one_pass_tuned, config)
        _only(monkeypatch, tdc._dcn_fwd_tuned, tdc._dcn_fwd_tuned.configs[0])
        assert_matches_torchvision("triton", dcn_problem("triton", **{**CASES[case], "b": 2, "h": 15, "w": 22}))
    assert splits and min(splits) > 1


def test_attention_prune_splits_exact_and_tensor_core_tiles():
    for tuner in (tna._nla_fwd_tuned, tna._nla_bwd_dq_tuned, tna._nla_bwd_dkdv_tuned):
        exact = tna._prune(tuner.configs, {}, IEEE=True)
        fast = tna._prune(tuner.configs, {}, IEEE=False)
        assert exact and fast and len(exact) + len(fast) == len(tuner.configs)
        assert all(c.kwargs["BLOCK_Q"] * c.kwargs["BLOCK_KV"] <= tna._EXACT_AREA for c in exact)


@pytest.mark.parametrize("kernel", ["forward", "dq", "dkdv"])
def test_every_attention_config(monkeypatch, kernel):
    monkeypatch.setattr(tna, "_tuned", lambda device, d_block: True)
    tuners = {"forward": tna._nla_fwd_tuned, "dq": tna._nla_bwd_dq_tuned, "dkdv": tna._nla_bwd_dkdv_tuned}
    tuner = tuners.pop(kernel)
    for other in tuners.values():  # every pass runs all three kernels: the others pinned
        _only(monkeypatch, other, other.configs[0])
    q, k, v = problem(b=2, n=37, m=150, d=5, dv=7)
    grad_out = torch.randn(2, 37, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = expected(q, k, v, 0.6, grad_out)
    for config in list(tuner.configs):
        _only(monkeypatch, tuner, config)
        for name, a, e in zip(NAMES, triton_all(q, k, v, 0.6, grad_out), want):
            torch.testing.assert_close(a, e, rtol=TOL[torch.float64], atol=TOL[torch.float64],
                                       msg=lambda m, n=name, c=config: f"{n} with {c}: {m}")


def test_one_precision_table_follows_both_of_torchs_tf32_settings():
    from megan_fast.triton import graph_aggregate as tga
    from megan_fast.triton._utils import precision, tf32_allowed

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, "fp32_precision", None)
    legacy_before = None if before is not None else matmul.allow_tf32

    def graph_ieee(dtype, device):  # graph aggregation reads the same table as the other ops
        return tga._common_meta(tga._config(5, 64, 16, device, backward=False), 5, dtype, device, False)["IEEE"]

    try:
        assert not tf32_allowed() and precision(torch.float32, cuda).ieee and graph_ieee(torch.float32, cuda)
        if before is not None:
            matmul.fp32_precision = "tf32"  # the current API; reading allow_tf32 now would raise
            assert tf32_allowed() and not precision(torch.float32, cuda).ieee and not graph_ieee(torch.float32, cuda)
            matmul.fp32_precision = "ieee"
            assert precision(torch.float32, cuda).ieee
        matmul.allow_tf32 = True  # the legacy API
        assert tf32_allowed() and not precision(torch.float32, cuda).ieee and not graph_ieee(torch.float32, cuda)
        # never TF32 for float64 or under the interpreter; fp16/bf16 are products in their own type
        assert precision(torch.float64, cuda).ieee and precision(torch.float32, cpu).ieee
        assert graph_ieee(torch.float32, cpu)
        assert not precision(torch.float16, cuda).ieee and not precision(torch.bfloat16, cpu).ieee
        assert precision(torch.float64, cpu).accumulate == torch.float64
        assert precision(torch.bfloat16, cuda).accumulate == torch.float32
    finally:
        if before is not None:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = legacy_before
