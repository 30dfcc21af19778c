"""megan-fast train / eval on tiny real-texture clips: resume, DDP, the Trainer's steps, protocol accounting, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("skimage", reason="scikit-image provides the photos the test clips are made from")

from megan_fast.cli.main import main  # noqa: E402
from megan_fast.data import synthetic  # noqa: E402
from megan_fast.errors import ConfigError  # noqa: E402
from megan_fast.models import MEGAN  # noqa: E402
from megan_fast.training import Trainer, charbonnier, load_config, train  # noqa: E402
from _models import TINY_MEGAN as TINY, save_tiny_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread per process: the tensors here are tiny, and on a busy 2-core machine two threads that wait for
    each other make every step many times slower (the results are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vimeo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vimeo")
    clips = {
        f"00001/{i:04d}": synthetic.make_clip(name, 7, size=(32, 32), motion=motion, seed=i)
        for i, (name, motion) in enumerate([("astronaut", "pan"), ("coffee", "zoom"), ("chelsea", "pan"),
                                            ("rocket", "zoom")], start=1)
    }
    synthetic.write_vimeo_layout(str(root), clips, lists={"sep_trainlist.txt": list(clips), "sep_testlist.txt": list(clips)[:1]})
    return str(root)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A model folder of a random tiny MEGAN, for the eval tests."""
    return save_tiny_model(tmp_path_factory.mktemp("ckpt"))


def write_config(path, vimeo, out, model=(), data=(), logging=(), **optim):
    """Writes the config of a tiny run to ``path``: the TINY network, 2 items of 4x4 LR pixels a batch from the
    ``vimeo`` clips, validation on its test clip, 3 iterations, a checkpoint after each; the sections updated
    with ``model``, ``data``, ``logging`` and ``optim`` (``data={"val": None}``: no validation)."""
    cfg = {
        "name": "tiny", "output_dir": str(out), "seed": 3, "model": {**TINY, **dict(model)},
        "data": {"train": {"type": "vimeo90k", "root": vimeo, "crop": 4}, "batch_size": 2, "num_workers": 0,
                 "val": {"type": "vimeo90k", "root": vimeo, "split": "test"}, **dict(data)},
        "optim": dict({"iterations": 3, "lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.5}, **optim),
        "logging": {"print_every": 1, "val_every": 3, "save_every": 1, "tensorboard": False, **dict(logging)},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_two_iterations_then_resume_equals_three(tmp_path, vimeo):
    full = load_config(write_config(tmp_path / "a.yaml", vimeo, tmp_path / "full"))
    split = load_config(write_config(tmp_path / "b.yaml", vimeo, tmp_path / "split"))
    r_full = train(full, device="cpu", progress=False)
    r_first = train(split, device="cpu", progress=False, stop_at=2)
    assert r_first.iteration == 2
    r_rest = train(split, resume=True, device="cpu", progress=False)
    assert r_full.iteration == r_rest.iteration == 3
    a = torch.load(r_full.checkpoint, weights_only=True)
    b = torch.load(r_rest.checkpoint, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert r_full.last_loss == r_rest.last_loss
    assert r_full.val_psnr is not None and r_full.val_psnr == r_rest.val_psnr
    # A usable model folder is written beside the checkpoints.
    assert MEGAN.from_pretrained(tmp_path / "full" / "model").config.nf == 8


class L1Trainer(Trainer):
    """A subclass as a user writes one: the L1 loss, and a hook that records each step's (iteration, loss)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[int, float]] = []

    def compute_loss(self, pred, target):
        return F.l1_loss(pred, target)

    def on_step_end(self, iteration, loss):
        self.steps.append((iteration, loss.item()))


def test_a_trainer_subclass_changes_the_loss_and_resumes_exactly(tmp_path, vimeo):
    def trainer(name, **kwargs):
        # A large Charbonnier epsilon: if that loss were used, the losses would be far from L1's.
        cfg = write_config(tmp_path / f"{name}.yaml", vimeo, tmp_path / name, iterations=2, charbonnier_eps=0.5,
                           data={"val": None})
        return L1Trainer(load_config(cfg), device="cpu", progress=False, **kwargs)

    full = trainer("full")
    full.setup()
    # The first step's loss, computed here: the run's first batch, the model as set up, the memory frames the
    # step will draw (the RNG is put back).
    batch = next(iter(full.batches(0, 0)))
    rng = torch.get_rng_state()
    memory = full.model.lmga.draw_memory_indices(full.model.config.num_output_frames)
    pred = full.model(batch["lq"], memory_indices=memory).float()
    torch.set_rng_state(rng)
    result = full.fit()
    assert [it for it, _ in full.steps] == [1, 2]  # once per iteration
    assert full.steps[0][1] == F.l1_loss(pred, batch["gt"]).item()
    assert abs(full.steps[0][1] - charbonnier(pred, batch["gt"], 0.5).item()) > 0.1
    assert full.steps[-1][1] == result.last_loss  # the loss the run reports
    first = trainer("split", stop_at=1)
    first.fit()
    rest = trainer("split", resume=True)
    rest.fit()
    assert first.steps + rest.steps == full.steps  # the same losses, bit for bit
    a, b = (torch.load(tmp_path / name / "checkpoints" / "iter_2.pt", weights_only=True) for name in ("full", "split"))
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_train_command_and_config_errors(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "cli", iterations=1)
    assert main(["train", "--config", cfg, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iteration"] == 1
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("optim: {lr: -1}\ndata: {train: {root: x}}", "optim.lr must be positive"),
        ("optim: {learning_rate: 1}", "unknown config entry 'optim.learning_rate'"),
        ("data: {train: {root: null}}", "data.train.root must be set"),
        ("model: {nf: 12, deformable_groups: 8}\ndata: {train: {root: x}}", "divisible by deformable_groups"),
        ("[1, 2", "not valid YAML"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(bad))
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path, vimeo):
    cfg = write_config(tmp_path / "d.yaml", vimeo, tmp_path / "ddp", iterations=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "megan_fast", "train", "--config", cfg, "--device", "cpu"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "iter_2.pt", weights_only=True)
    assert ckpt["iteration"] == 2 and len(ckpt["rng"]["torch"]) == 2


def test_eval_accounting_and_json(tmp_path, tiny_checkpoint, capsys):
    # Folder layout: clips of 7, 9 and 10 frames -> windows [0], [0, 2], [0, 3].
    gt_root = tmp_path / "gt"
    lengths = {"a": 7, "b": 9, "c": 10}
    for name, t in lengths.items():
        synthetic.write_clip_folder(synthetic.make_clip("coffee", t, size=(16, 16), seed=t), str(gt_root / name))
    out_json = tmp_path / "scores.json"
    frames_dir = tmp_path / "frames"
    assert main(["eval", "--checkpoint", tiny_checkpoint, "--data", str(gt_root), "--json", str(out_json),
                 "--save-frames", str(frames_dir), "--device", "cpu"]) == 0
    report = json.loads(out_json.read_text())
    assert set(report["clips"]) == set(lengths)
    for name, t in lengths.items():
        assert report["clips"][name]["frames"] == t  # every GT frame scored exactly once
        assert set(report["clips"][name]) == {"psnr_y", "ssim_y", "frames"}
        assert len(os.listdir(frames_dir / name)) == t
    assert report["average"]["frames"] == sum(lengths.values())
    assert report["average"]["psnr_y"] == pytest.approx(sum(c["psnr_y"] for c in report["clips"].values()) / 3)
    base = report["baselines"]["bicubic_blend"]
    assert set(base["clips"]) == set(lengths) and base["average"]["psnr_y"] > 15
    table = capsys.readouterr().out
    assert "average" in table and "bicubic+blend" in table
    assert main(["eval", "--checkpoint", tiny_checkpoint, "--data", str(tmp_path / "nope")]) == 2


def test_eval_on_vimeo_layout(tmp_path, vimeo, tiny_checkpoint):
    out_json = tmp_path / "v.json"
    assert main(["eval", "--checkpoint", tiny_checkpoint, "--data", vimeo, "--split", "test",
                 "--json", str(out_json), "--device", "cpu"]) == 0
    report = json.loads(out_json.read_text())
    assert list(report["clips"]) == ["00001/0001"] and report["clips"]["00001/0001"]["frames"] == 7


# --------------------------------------------------------------------------- safety: checkpoints, configs, outputs


def test_planted_checkpoint_is_not_run(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=2)
    assert main(["train", "--config", cfg, "--device", "cpu", "--stop-at", "1"]) == 0
    capsys.readouterr()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload()}, tmp_path / "run" / "checkpoints" / "iter_5.pt")
    config_before = (tmp_path / "run" / "config.yaml").read_bytes()
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "iter_5.pt: not a megan-fast training checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()  # nothing in the file was run
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config_before  # a failed resume writes nothing
    (tmp_path / "run" / "checkpoints" / "iter_5.pt").write_bytes(b"\x00" * 10)
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 2
    assert "iter_5.pt: not a megan-fast training checkpoint" in capsys.readouterr().err
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "iteration": 1, "rng": {}},
               tmp_path / "run" / "checkpoints" / "iter_5.pt")
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 2
    assert "does not fit this run's config" in capsys.readouterr().err


def test_stray_files_in_the_checkpoint_folder_are_left_alone(tmp_path, vimeo):
    cfg = load_config(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=3))
    cfg.logging.keep_checkpoints = 1
    train(cfg, device="cpu", progress=False, stop_at=1)
    ckpts = tmp_path / "run" / "checkpoints"
    for stray in ("iter_2.pt.tmp-1234", ".megan-fast-abcd.pt", "notes.txt", "iter_x.pt"):
        (ckpts / stray).write_text("stray")
    result = train(cfg, resume=True, device="cpu", progress=False)
    assert result.iteration == 3
    assert sorted(os.listdir(ckpts)) == sorted(["iter_3.pt", "iter_2.pt.tmp-1234", ".megan-fast-abcd.pt",
                                               "notes.txt", "iter_x.pt"])
    # Checkpoints hold plain data only: they load with weights_only=True.
    state = torch.load(ckpts / "iter_3.pt", weights_only=True)
    assert state["iteration"] == 3 and isinstance(state["rng"]["torch"][0], torch.Tensor)


def test_config_entries_are_typed_and_ranged_at_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    root = "data: {train: {root: x}}\n"
    for text, message in [
        ("optim: {lr: '1e-4'}\n" + root, r"optim.lr must be a number, got '1e-4' \(write numbers without quotes\)"),
        ("data: {train: {root: x, crop: 0}}", "data.train.crop must be >= 1"),
        ("logging: {save_every: 0}\n" + root, "logging.save_every must be >= 1"),
        ("logging: {val_every: -1}\n" + root, "logging.val_every must be >= 1"),
        ("logging: {print_every: 1.5}\n" + root, "logging.print_every must be an integer"),
        ("logging: {tensorboard: 1}\n" + root, "logging.tensorboard must be true or false"),
        ("model: {front_blocks: -1}\n" + root, "model: front_blocks must be >= 0"),
        ("model: {nf: true}\n" + root, "model: nf must be an integer"),
        ("model: {nfx: 8}\n" + root, "model: unknown field 'nfx'"),
        ("optim: {iterations: 10.0}\n" + root, "optim.iterations must be an integer"),
        ("optim: {betas: [0.9]}\n" + root, "optim.betas must be a list of two numbers"),
        ("optim: {ema_decay: 1}\n" + root, r"optim.ema_decay must be in \[0, 1\)"),
        ("optim: {lr: .nan}\n" + root, "optim.lr must be positive"),
        ("optim: {compile: max-autotune}\n" + root, "optim.compile must be none, default, reduce-overhead"),
        ("data: {batch_size: 0, train: {root: x}}", "data.batch_size must be >= 1"),
        ("data: {train: {root: x}, val: {type: folder, root: 3}}", "data.val.root must be a non-empty string"),
        ("data: {train: {type: photos, photos: chelsea}}", "data.train.photos must be a non-empty list"),
        ("optim: 3\n" + root, "optim must be a mapping"),
        ("seed: -1\n" + root, "seed must be >= 0"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(bad))
    bad.write_text("optim: {lr: 1e-4}\n" + root)  # YAML 1.1 reads this as a string; we read a number
    assert load_config(str(bad)).optim.lr == 1e-4


def test_everything_is_checked_before_anything_is_written(tmp_path, vimeo, capsys):
    # A bad validation set, a missing data folder or a bad output_dir fail at once, and leave nothing.
    cases = [
        ({"val": {"type": "folder", "root": str(tmp_path / "missing")}}, "data.val"),
        ({"train": {"type": "vimeo90k", "root": str(tmp_path / "missing"), "crop": 4}}, "data.train"),
    ]
    for data, message in cases:
        cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", data=data)
        assert main(["train", "--config", cfg, "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--config", cfg, "--output-dir", str(tmp_path / "afile"), "--device", "cpu"]) == 2
    assert "is a file, but a training run folder" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--output-dir", vimeo + "/runs", "--device", "cpu"]) == 2
    assert "lies inside the input data.train.root" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--output-dir", "", "--device", "cpu"]) == 2
    assert "output_dir is empty" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("x")
    assert main(["train", "--config", cfg, "--output-dir", str(tmp_path / "used"), "--device", "cpu"]) == 2
    assert "is not empty (it holds 'mine.txt'); pass --resume" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--device", "bogus"]) == 2
    assert "--device 'bogus'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["afile", "c.yaml", "used"]


def test_cli_numbers_are_ranged_and_results_are_strict_json(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=1)
    for flag in ("--iterations", "--stop-at"):
        for value in ("-3", "0", "x"):
            with pytest.raises(SystemExit) as exc:
                main(["train", "--config", cfg, flag, value])
            assert exc.value.code == 2
            assert f"argument {flag}: expected an integer >= 1" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--device", "cpu"]) == 0
    capsys.readouterr()
    # Resuming a finished run trains nothing: the last loss is unknown, written as null, not NaN.
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert result["iteration"] == 1 and result["last_loss"] is None and "notes" in result


def test_eval_checks_its_outputs_first_and_writes_strict_json(tmp_path, capsys, monkeypatch):
    from megan_fast.data.imresize import imresize
    from megan_fast.evaluation import bicubic_blend

    save_tiny_model(tmp_path / "ckpt", global_skip=True)  # output = bicubic + blending exactly
    # A clip whose ground truth is exactly the baseline's output: PSNR is infinite.
    lq7 = imresize(synthetic.make_clip("coffee", 7, size=(16, 16), seed=1), scale=0.25).clamp(0, 1)
    lq7 = lq7.mul(255).round().div(255)
    gt = bicubic_blend(lq7[0::2]).clamp(0, 1).mul(255).round().div(255)
    synthetic.write_clip_folder(gt, str(tmp_path / "gt" / "a"))
    synthetic.write_clip_folder(lq7, str(tmp_path / "lq" / "a"))
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "gt"), "--lq",
            str(tmp_path / "lq"), "--device", "cpu"]
    import megan_fast.evaluation as evaluation

    real_evaluate = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking outputs"))
    assert main([*args, "--json", str(tmp_path / "missing" / "s.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--json", str(tmp_path / "gt" / "s.json")]) == 2
    assert "lies inside the input --data" in capsys.readouterr().err
    assert main([*args, "--save-frames", str(tmp_path / "lq")]) == 2
    assert "is the input --lq" in capsys.readouterr().err
    monkeypatch.setattr(evaluation, "evaluate", real_evaluate)
    out = tmp_path / "s.json"
    assert main([*args, "--json", str(out), "--save-frames", str(tmp_path / "frames")]) == 0
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert report["clips"]["a"]["psnr_y"] is None and report["clips"]["a"]["ssim_y"] == pytest.approx(1.0)
    assert any("clips.a.psnr_y was inf" in n for n in report["notes"])
    assert main([*args, "--json", str(out)]) == 2  # exists: --overwrite needed
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--json", str(out), "--save-frames", str(tmp_path / "frames"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "frames" / "a")) == [f"{i:05d}.png" for i in range(7)]


class FirstFrames(torch.utils.data.Dataset):
    """The first ``n`` input frames of each item of ``dataset`` and their 2n - 1 targets."""

    def __init__(self, dataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {**item, "lq": item["lq"][: self.n], "gt": item["gt"][: 2 * self.n - 1]}


class TwoFrameTrainer(Trainer):
    """Trains a network of two input frames (3-frame sequences: the smallest that has every part) on the first
    two frames of each item."""

    def build_datasets(self):
        return tuple(None if d is None else FirstFrames(d, 2) for d in super().build_datasets())


def test_compiled_training_equals_eager_and_resumes_exactly(tmp_path, vimeo, monkeypatch):
    """optim.compile: the step as one torch.compile(fullgraph=True) graph, compiled once; the runs after the first
    reuse it.  The Trainer's compile runs with the aot_eager backend: dynamo's graph and AOTAutograd's joint forward
    and backward, where our ops' fake kernels and autograd formulas matter, as on a GPU.  Inductor's code
    generation is tested on the eval forward (test_capture.py): on the CPU it writes C++ (minutes for a backward
    graph on two cores), on a GPU Triton."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile

    def aot_eager(model, mode=None, **kwargs):
        assert mode == "default"  # what the config asked for
        return compile_(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)

    def run(name, **kwargs):
        cfg = write_config(tmp_path / f"{name}.yaml", vimeo, tmp_path / name, model={"num_input_frames": 2},
                           iterations=2, compile="none" if name == "eager" else "default")
        return TwoFrameTrainer(load_config(cfg), device="cpu", progress=False, **kwargs).fit()

    eager = run("eager")
    graphs = counters["stats"]["unique_graphs"]
    full = run("full")
    assert run("split", stop_at=1).iteration == 1
    rest = run("split", resume=True)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert full.last_loss == rest.last_loss
    a, b, e = (torch.load(r.checkpoint, weights_only=True)["model"] for r in (full, rest, eager))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")  # exact resume
        torch.testing.assert_close(a[key], e[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_resume_from_the_runs_own_config(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=2)
    assert main(["train", "--config", cfg, "--device", "cpu", "--stop-at", "1"]) == 0
    saved = str(tmp_path / "run" / "config.yaml")
    assert open(saved).readline().startswith("# megan-fast ")
    assert main(["train", "--config", saved, "--device", "cpu", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iteration"] == 2
    # A fresh run may not use a config that lies inside its output_dir.
    assert main(["train", "--config", saved, "--device", "cpu"]) == 2
    assert "contains the input --config" in capsys.readouterr().err


def start_long_run(tmp_path, vimeo, **logging):
    """Starts ``megan-fast train`` of a long tiny run with two data workers, in a process group of its own (as a
    batch scheduler starts it); one thread a process, so that the steps and the workers need not share cores."""
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=100000,
                       data={"num_workers": 2, "val": None}, logging=logging)
    return subprocess.Popen([sys.executable, "-m", "megan_fast", "train", "--config", cfg, "--device", "cpu"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_until(proc, done) -> None:
    """Waits (five minutes at the most) until ``done()``; the process must still be running then."""
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not done():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]


def ended_quietly(proc, code: int) -> str:
    """The stderr of ``proc`` once it has ended with exit status ``code`` and no traceback."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    return err


def test_sigterm_with_data_workers_is_one_line(tmp_path, vimeo):
    proc = start_long_run(tmp_path, vimeo)
    ckpts = tmp_path / "run" / "checkpoints"
    wait_until(proc, lambda: ckpts.is_dir() and len(os.listdir(ckpts)) >= 2)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as a batch scheduler does
    err = ended_quietly(proc, 143)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line
             and "s/it" not in line]
    assert lines == ["megan-fast train: terminated (SIGTERM); nothing half-written was left"], err[-2000:]
    assert not [n for n in os.listdir(ckpts) if n.startswith(".megan-fast-")]


def test_a_fresh_run_ignores_our_temporaries(tmp_path, vimeo):
    cfg = load_config(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=1))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".megan-fast-k3j4h5g6").write_bytes(b"")  # another process's write probe, say
    assert train(cfg, device="cpu", progress=False).iteration == 1


def test_links_inside_a_run_folder_are_refused(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=2)
    assert main(["train", "--config", cfg, "--device", "cpu", "--stop-at", "1"]) == 0
    elsewhere = tmp_path / "elsewhere"
    os.rename(tmp_path / "run" / "model", elsewhere)
    (elsewhere / "config.json").write_text("precious")
    (tmp_path / "run" / "model").symlink_to(elsewhere)
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 2
    assert "'model' in it is a symbolic link" in capsys.readouterr().err
    assert (elsewhere / "config.json").read_text() == "precious"


def test_configs_that_do_not_fit_the_data_fail_before_writing(tmp_path, vimeo, capsys):
    base = yaml.safe_load(open(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run")))
    cases = [
        ({"data": {"train": {"crop": 1000}}}, "crop=1000 is larger than the LR frame"),
        ({"data": {"train": {"scale": 2}}}, "MEGAN upscales x4"),
        ({"data": {"train": {"lq_root": vimeo}}}, "LR must be GT/4"),
        ({"model": {"num_input_frames": 2}}, "model.num_input_frames 2 needs 2 and 3"),
        ({"seed": 2**63}, "seed must be < 2**32"),
    ]
    for change, message in cases:
        cfg = yaml.safe_load(yaml.safe_dump(base))
        for key, value in change.items():
            if isinstance(value, dict) and key == "data":
                cfg["data"]["train"].update(value["train"])
            elif isinstance(value, dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", "--config", str(tmp_path / "c.yaml"), "--device", "cpu"]) == 2, change
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (change, err)
        assert not (tmp_path / "run").exists(), change


def interrupted_loss(*args):
    raise KeyboardInterrupt


def test_a_failed_start_can_simply_be_run_again(tmp_path, vimeo, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=1)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "compute_loss", interrupted_loss)
        assert main(["train", "--config", cfg, "--device", "cpu"]) == 130
    assert not (tmp_path / "run").exists()  # it wrote config.yaml and checkpoints/, and took them back
    # A start killed outright (SIGKILL) leaves them: such a folder may be started again.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("# megan-fast 0.1.0 train: the resolved config of this run\n")
    assert main(["train", "--config", cfg, "--device", "cpu"]) == 0
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "iter_1.pt")


def test_yaml_details(tmp_path, monkeypatch):
    bad = tmp_path / "c.yaml"
    bad.write_text("optim: {lr: 0.1}\noptim: {lr: 0.2}\ndata: {train: {root: x}}\n")
    with pytest.raises(ConfigError, match="the key 'optim' is given twice"):
        load_config(str(bad))
    monkeypatch.setenv("HOME", str(tmp_path))
    bad.write_text("output_dir: ~/runs/x\ndata: {train: {root: ~/data}}\n")
    cfg = load_config(str(bad))
    assert cfg.output_dir == str(tmp_path / "runs" / "x") and cfg.data.train["root"] == str(tmp_path / "data")


def test_checkpoint_iteration_must_be_sane(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=2)
    assert main(["train", "--config", cfg, "--device", "cpu", "--stop-at", "1"]) == 0
    path = tmp_path / "run" / "checkpoints" / "iter_1.pt"
    state = torch.load(path, weights_only=True)
    state["iteration"] = -5
    torch.save(state, path)
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 2
    assert "not a megan-fast training checkpoint (iteration -5)" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before


def test_eval_checks_clip_sizes_first(tmp_path, tiny_checkpoint, capsys):
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 7, size=(30, 30), seed=1), str(tmp_path / "gt" / "odd"))
    assert main(["eval", "--checkpoint", tiny_checkpoint, "--data", str(tmp_path / "gt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "clip 'odd': frames are 30x30" in err and "multiples of 4" in err and "odd:" not in err.split("error")[0]


@pytest.mark.parametrize("left", ["empty checkpoints", "config and a temporary"])
def test_what_a_killed_start_leaves_can_be_started_again(tmp_path, vimeo, left):
    cfg = load_config(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=1))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    if left == "config and a temporary":
        (tmp_path / "run" / "config.yaml").write_text("# megan-fast 0.1.0 train: the resolved config of this run\n")
        (tmp_path / "run" / "checkpoints" / ".megan-fast-adravtfw.pt").write_bytes(b"half a checkpoint")
    assert train(cfg, device="cpu", progress=False).iteration == 1


def test_a_failed_start_removes_the_parent_folders_it_made(tmp_path, vimeo, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "deep" / "x" / "run", iterations=1)
    monkeypatch.setattr(Trainer, "compute_loss", interrupted_loss)
    assert main(["train", "--config", cfg, "--device", "cpu"]) == 130
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_yaml_merge_keys_and_odd_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: &tr {type: folder, root: x, crop: 2}\n  val: {<<: *tr, crop: null}\n")
    cfg = load_config(str(path))
    assert cfg.data.val == {"type": "folder", "root": "x", "crop": None}
    path.write_text("name: t\n? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="a key must be a plain value"):
        load_config(str(path))


def test_resume_refuses_a_model_folder_that_is_not_the_runs_own(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=3)
    assert main(["train", "--config", cfg, "--device", "cpu", "--stop-at", "1"]) == 0
    model = tmp_path / "run" / "model"
    (model / "config.json").unlink()
    (tmp_path / "mine.json").write_text("precious")
    (model / "config.json").symlink_to(tmp_path / "mine.json")
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 2
    assert "'model/config.json' is not a file of the run's own" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before  # refused before any training
    (model / "config.json").unlink()
    os.rename(model, tmp_path / "model_moved")
    model.write_text("a file")
    assert main(["train", "--config", cfg, "--device", "cpu", "--resume"]) == 2
    assert "'model' in it is a file" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "precious"


def test_resume_from_inside_the_run_folder(tmp_path, vimeo, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=2)
    assert main(["train", "--config", cfg, "--device", "cpu", "--stop-at", "1"]) == 0
    monkeypatch.chdir(tmp_path / "run")
    assert main(["train", "--config", "config.yaml", "--device", "cpu", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iteration"] == 2


def test_eval_checks_every_frame_size_first(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import megan_fast.evaluation as evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("the model ran before the check"))
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 7, size=(16, 16), seed=1), str(tmp_path / "ev" / "a"))
    clip_b = synthetic.make_clip("coffee", 7, size=(16, 16), seed=2)
    synthetic.write_clip_folder(clip_b[:5], str(tmp_path / "ev" / "b"))
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 2, size=(20, 20)), str(tmp_path / "ev" / "b"), start=5)
    args = ["eval", "--checkpoint", tiny_checkpoint, "--device", "cpu"]
    assert main([*args, "--data", str(tmp_path / "ev")]) == 2
    assert "clip 'b': frame 00005.png is 20x20 but 00000.png is 16x16" in capsys.readouterr().err
    odd = {"00001/0001": synthetic.make_clip("rocket", 7, size=(32, 32)),
           "00001/0002": synthetic.make_clip("rocket", 7, size=(30, 30))}
    synthetic.write_vimeo_layout(str(tmp_path / "vimeo_odd"), odd)
    assert main([*args, "--data", str(tmp_path / "vimeo_odd")]) == 2
    assert "clip '00001/0002': frames are 30x30" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_repeated_signal_does_not_break_the_cleanup(tmp_path, vimeo, sig):
    proc = start_long_run(tmp_path, vimeo, save_every=1000)
    wait_until(proc, (tmp_path / "run" / "config.yaml").exists)
    time.sleep(0.5)
    for _ in range(2):  # a double Ctrl-C
        os.killpg(proc.pid, getattr(signal, sig))
        time.sleep(0.01)
    ended_quietly(proc, 130 if sig == "SIGINT" else 143)
    assert not (tmp_path / "run").exists()  # no checkpoint yet: the start was taken back


def test_a_training_config_may_name_a_model_of_the_family(tmp_path, vimeo):
    cfg = load_config(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run"))
    cfg.model = {"name": "zooming_slowmo", **{k: TINY[k] for k in ("nf", "deformable_groups", "front_blocks",
                                                                   "back_blocks")}}
    model_cfg = cfg.model_config()
    assert model_cfg.family_name == "Zooming Slow-Mo" and model_cfg.nf == 8 and model_cfg.back_blocks == 1
    cfg.model = {"name": "tmnet2"}
    with pytest.raises(ConfigError, match="unknown model 'tmnet2'; known models: megan, tmnet, zooming_slowmo"):
        cfg.model_config()
    cfg.model = {"name": "tmnet", "nff": 1}
    with pytest.raises(ConfigError, match="unknown field 'nff'"):
        cfg.model_config()


def test_a_checkpoint_whose_optimizer_state_does_not_fit_is_one_line(tmp_path, vimeo, capsys):
    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=1, data={"val": None})
    train(load_config(cfg), device="cpu", progress=False)
    path = tmp_path / "run" / "checkpoints" / "iter_1.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5)
    torch.save(state, path)
    assert main(["train", "--config", cfg, "--resume", "--iterations", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run's config (optimizer state 0.exp_avg has shape (5,)" in err
    assert len(err.strip().splitlines()) == 1
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(1).expand(2**26)  # 256 MiB claimed, 4 bytes stored
    torch.save(state, path)
    assert main(["train", "--config", cfg, "--resume", "--iterations", "2", "--device", "cpu"]) == 2
    assert "not a megan-fast training checkpoint" in capsys.readouterr().err
