"""The megan-fast console script."""

import subprocess
import sys

from megan_fast.cli.main import main


def test_info_lists_kernels_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "native (C++, CPU):" in out
    assert "triton (cpu):" in out
    assert "modulated_deform_conv2d" in out


def test_python_dash_m_runs():
    res = subprocess.run([sys.executable, "-m", "megan_fast", "info"], capture_output=True, text=True, check=True)
    assert "megan_fast" in res.stdout and "backend:" in res.stdout


def test_bench_prints_a_ratio_row_per_case(capsys, monkeypatch):
    from megan_fast import benchmarking

    tiny = (benchmarking.DCNCase("tiny-case", 1, 8, 6, 7, offset_groups=2),)
    monkeypatch.setattr(benchmarking, "DCN_CASES", tiny)
    assert main(["bench", "--backends", "reference", "--min-time", "0.01"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("tiny-case")]
    assert len(lines) == 2  # fwd and fwd+bwd
    assert all("reference" in line and line.rstrip().endswith("x") for line in lines)


def test_timings_run_with_the_threads_they_report():
    # torch.utils.benchmark.Timer runs with one thread unless told: `bench --threads N` must time N.
    import torch

    from megan_fast.benchmarking import median_seconds

    seen, before = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        median_seconds(lambda: seen.append(torch.get_num_threads()), min_run_time=0.01)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


def test_bad_command_exits_nonzero():
    res = subprocess.run([sys.executable, "-m", "megan_fast", "nope"], capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr
