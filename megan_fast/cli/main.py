"""``megan-fast`` console script: ``info``, ``bench``, ``demo``, ``train``, ``eval``, ``upscale``, ``convert``,
``export``.

Every command runs inside :func:`main`, which turns what the user can cause
into one line on stderr and an exit status, never a traceback:
:class:`megan_fast.errors.MeganFastError` and failed file operations (status
2 and 1), Ctrl-C (130) and SIGTERM (143, after the temporaries are removed).
Warnings print as ``megan-fast CMD: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import warnings

from megan_fast.cli._common import Parser, int_at_least, positive_float, resolve_device


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import megan_fast
    from megan_fast import _ext
    from megan_fast.ops import _backend

    print(f"megan_fast {megan_fast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import torchvision

        print(f", torchvision {torchvision.__version__}", end="")
    except ImportError:
        pass
    try:
        import triton

        print(f", triton {triton.__version__}")
    except ImportError:
        print(", triton not installed")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"CPU threads: {torch.get_num_threads()}; CUDA device: {cuda}")
    print()
    print("kernels:")
    if _ext.NATIVE_AVAILABLE:
        print(f"  native (C++, CPU): built; code path {torch.ops.megan_fast.cpu_isa()} "
              "(MEGAN_FAST_CPU_ISA=avx2|baseline caps it)")
    else:
        print(f"  native (C++, CPU): not built: {_ext.NATIVE_ERROR}")
    for dt in _backend.DEVICE_TYPES:
        reason = _backend.triton_status(dt)
        print(f"  triton ({dt}): {'available' if reason is None else 'unavailable: ' + reason}")
    print("  triton on a real GPU (tests passed and measured there; until then auto runs the peer on CUDA):")
    for op, passes in sorted(_backend.GPU_VERIFIED.items()):
        state = ", ".join(f"{name} {'verified' if ok else 'not yet'}" for name, ok in passes.items())
        print(f"    {op:<26} {state}")
    print()
    env = os.environ.get(_backend.ENV_VAR)
    print(f"backend: {_backend.get_backend()}" + (f" (from {_backend.ENV_VAR}={env})" if env else ""))
    print(f"  {'op':<28} {'device':<7} {'backend':<18} status")
    for row in _backend.describe():
        print(f"  {row['op']:<28} {row['device']:<7} {row['backend']:<18} {row['status']}")
    print()
    print("  native = the op's C++ CPU kernels; triton = its Triton kernels (the op's CUDA kernels; on CPU tensors")
    print("  the same launchers under TRITON_INTERPRET=1); reference = plain PyTorch; stock = torchvision / SDPA.")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from megan_fast import benchmarking

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = tuple(args.backends.split(","))
    if "stock" not in backends:
        backends = backends + ("stock",)
    print(f"modulated_deform_conv2d on {args.device}, float32, {torch.get_num_threads()} threads, median ms per call")
    header = f"{'case':<16} {'pass':<8} " + " ".join(f"{b:>10}" for b in backends) + "  speed-up vs stock"
    print(header)
    for row in benchmarking.dcn_summary(backends, device=args.device, min_run_time=args.min_time):
        secs = row["seconds"]
        cells = " ".join(f"{secs[b] * 1e3:>10.2f}" for b in backends)
        ratios = ", ".join(f"{b} {secs['stock'] / secs[b]:.1f}x" for b in backends if b != "stock")
        print(f"{row['case']:<16} {row['pass']:<8} {cells}  {ratios}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="megan-fast", description="Fast MEGAN space-time video super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="which kernels are built and which backend each op uses")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="time the fused ops against the stock implementation")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backends", default="native,stock", help="comma-separated backends (default: native,stock)")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--min-time", type=positive_float, default=1.0, help="seconds of timing per measurement")
    p.set_defaults(func=_cmd_bench)
    from megan_fast.cli import convert, demo, export, train_eval, upscale

    demo.add_parser(sub)
    train_eval.add_parsers(sub)
    upscale.add_parser(sub)
    convert.add_parser(sub)
    export.add_parser(sub)
    return parser


@contextlib.contextmanager
def _one_line_warnings(name: str):
    """Shows warnings as ``NAME: warning: message`` (no file and line) while a command runs."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _leave_processes(ok: bool) -> None:
    """Under torchrun: leaves the process group (megan_fast.distributed), once torch is loaded anyway."""
    if "torch.distributed" in sys.modules:
        from megan_fast.distributed import finish_processes

        finish_processes(ok)


def main(argv: list[str] | None = None) -> int:
    from megan_fast import outputs
    from megan_fast.errors import MeganFastError, one_line

    args = build_parser().parse_args(argv)
    name = f"megan-fast {args.command}"
    with _one_line_warnings(name), outputs.sigterm_raises():
        try:
            if args.command == "bench":
                resolve_device(args.device)
            status = args.func(args)
            _leave_processes(status == 0)
            return status
        except MeganFastError as exc:
            print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # OUTPUT -: the program reading standard output stopped reading
            outputs.remove_leftovers()
            try:  # nothing more goes to the closed pipe, not even Python's final flush
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except OSError:
                pass
            print(f"{name}: error: the program reading standard output closed it; stopped", file=sys.stderr)
            return 1
        except OSError as exc:  # the file system refused (read-only, full, permissions)
            print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, outputs.Terminated) as exc:
            outputs.remove_leftovers()
            interrupted = type(exc)  # not the exception: its traceback would keep the command's objects alive
            kept = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
            if argv is None:  # the process is ending: a repeated signal must not break its teardown
                outputs.ignore_signals_after()
    if interrupted is KeyboardInterrupt:
        print(f"{name}: interrupted; nothing half-written was left{kept}", file=sys.stderr)
        return 130
    print(f"{name}: terminated (SIGTERM); nothing half-written was left{kept}", file=sys.stderr)
    return 143


if __name__ == "__main__":
    raise SystemExit(main())
