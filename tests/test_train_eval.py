"""megan-fast train / eval on tiny real-texture clips: resume, DDP, protocol accounting, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("skimage", reason="scikit-image provides the photos the test clips are made from")

from megan_fast.cli.main import main  # noqa: E402
from megan_fast.data import synthetic  # noqa: E402
from megan_fast.models import MEGAN  # noqa: E402
from megan_fast.training import ConfigError, load_config, train  # noqa: E402

TINY = dict(nf=8, deformable_groups=2, front_blocks=1, back_blocks=1, num_pfrdb=1, nonlocal_inner=4,
            graph_hidden=4, tau=2)


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


def write_config(path, vimeo, out, **optim):
    cfg = {
        "name": "tiny", "output_dir": str(out), "seed": 3, "model": TINY,
        "data": {"train": {"type": "vimeo90k", "root": vimeo, "crop": 4}, "batch_size": 2, "num_workers": 0,
                 "val": {"type": "vimeo90k", "root": vimeo, "split": "test"}},
        "optim": dict({"iterations": 3, "lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.5}, **optim),
        "logging": {"print_every": 1, "val_every": 3, "save_every": 1, "tensorboard": False},
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


def test_eval_accounting_and_json(tmp_path, capsys):
    # Folder layout: clips of 7, 9 and 10 frames -> windows [0], [0, 2], [0, 3].
    gt_root = tmp_path / "gt"
    lengths = {"a": 7, "b": 9, "c": 10}
    for name, t in lengths.items():
        synthetic.write_clip_folder(synthetic.make_clip("coffee", t, size=(16, 16), seed=t), str(gt_root / name))
    torch.manual_seed(0)
    MEGAN(**TINY).save_pretrained(tmp_path / "ckpt")
    out_json = tmp_path / "scores.json"
    frames_dir = tmp_path / "frames"
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(gt_root), "--json", str(out_json),
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
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "nope")]) == 2


def test_eval_on_vimeo_layout(tmp_path, vimeo):
    torch.manual_seed(0)
    MEGAN(**TINY).save_pretrained(tmp_path / "ckpt")
    out_json = tmp_path / "v.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", vimeo, "--split", "test",
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
    cfg["logging"]["keep_checkpoints"] = 1
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
    assert load_config(str(bad))["optim"]["lr"] == 1e-4


def test_everything_is_checked_before_anything_is_written(tmp_path, vimeo, capsys):
    # A bad validation set, a missing data folder or a bad output_dir fail at once, and leave nothing.
    cases = [
        ({"data": {"val": {"type": "folder", "root": str(tmp_path / "missing")}}}, "data.val"),
        ({"data": {"train": {"type": "vimeo90k", "root": str(tmp_path / "missing"), "crop": 4}}}, "data.train"),
    ]
    for change, message in cases:
        cfg = yaml.safe_load(open(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run")))
        for key, value in change["data"].items():
            cfg["data"][key] = value
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", "--config", str(tmp_path / "c.yaml"), "--device", "cpu"]) == 2
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

    torch.manual_seed(0)
    MEGAN(**TINY, global_skip=True).save_pretrained(tmp_path / "ckpt")  # output = bicubic + blending exactly
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


def test_compiled_training_equals_eager_and_resumes_exactly(tmp_path, vimeo):
    """optim.compile: the step as one torch.compile(fullgraph=True) graph (inductor on CPU)."""
    eager = train(load_config(write_config(tmp_path / "e.yaml", vimeo, tmp_path / "eager")), device="cpu",
                  progress=False)
    full = load_config(write_config(tmp_path / "a.yaml", vimeo, tmp_path / "full", compile="default"))
    split = load_config(write_config(tmp_path / "b.yaml", vimeo, tmp_path / "split", compile="default"))
    r_full = train(full, device="cpu", progress=False)
    train(split, device="cpu", progress=False, stop_at=2)
    r_rest = train(split, resume=True, device="cpu", progress=False)
    a, b, e = (torch.load(r.checkpoint, weights_only=True)["model"] for r in (r_full, r_rest, eager))
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


def test_sigterm_with_data_workers_is_one_line(tmp_path, vimeo):
    import signal
    import time

    cfg = yaml.safe_load(open(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=100000)))
    cfg["data"]["num_workers"] = 2
    cfg["data"].pop("val")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "megan_fast", "train", "--config", str(tmp_path / "c.yaml"),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (ckpts.is_dir() and len(os.listdir(ckpts)) >= 2):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as a batch scheduler does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
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


def test_a_failed_start_can_simply_be_run_again(tmp_path, vimeo, capsys, monkeypatch):
    import megan_fast.training.loop as training

    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=1)
    real = training.charbonnier

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "charbonnier", broken)
    assert main(["train", "--config", cfg, "--device", "cpu"]) == 130
    assert not (tmp_path / "run").exists()  # it wrote config.yaml and checkpoints/, and took them back
    # A start killed outright (SIGKILL) leaves them: such a folder may be started again.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("# megan-fast 0.1.0 train: the resolved config of this run\n")
    monkeypatch.setattr(training, "charbonnier", real)
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
    assert cfg["output_dir"] == str(tmp_path / "runs" / "x") and cfg["data"]["train"]["root"] == str(tmp_path / "data")


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


def test_eval_checks_clip_sizes_first(tmp_path, capsys):
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 7, size=(30, 30), seed=1), str(tmp_path / "gt" / "odd"))
    torch.manual_seed(0)
    MEGAN(**TINY).save_pretrained(tmp_path / "ckpt")
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "gt"), "--device",
                 "cpu"]) == 2
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
    import megan_fast.training.loop as training

    cfg = write_config(tmp_path / "c.yaml", vimeo, tmp_path / "deep" / "x" / "run", iterations=1)
    monkeypatch.setattr(training, "charbonnier", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["train", "--config", cfg, "--device", "cpu"]) == 130
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_yaml_merge_keys_and_odd_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: &tr {type: folder, root: x, crop: 2}\n  val: {<<: *tr, crop: null}\n")
    cfg = load_config(str(path))
    assert cfg["data"]["val"] == {"type": "folder", "root": "x", "crop": None}
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


def test_eval_checks_every_frame_size_first(tmp_path, vimeo, capsys, monkeypatch):
    import megan_fast.evaluation as evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("the model ran before the check"))
    torch.manual_seed(0)
    MEGAN(**TINY).save_pretrained(tmp_path / "ckpt")
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 7, size=(16, 16), seed=1), str(tmp_path / "ev" / "a"))
    clip_b = synthetic.make_clip("coffee", 7, size=(16, 16), seed=2)
    synthetic.write_clip_folder(clip_b[:5], str(tmp_path / "ev" / "b"))
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 2, size=(20, 20)), str(tmp_path / "ev" / "b"), start=5)
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]
    assert main([*args, "--data", str(tmp_path / "ev")]) == 2
    assert "clip 'b': frame 00005.png is 20x20 but 00000.png is 16x16" in capsys.readouterr().err
    odd = {"00001/0001": synthetic.make_clip("rocket", 7, size=(32, 32)),
           "00001/0002": synthetic.make_clip("rocket", 7, size=(30, 30))}
    synthetic.write_vimeo_layout(str(tmp_path / "vimeo_odd"), odd)
    assert main([*args, "--data", str(tmp_path / "vimeo_odd")]) == 2
    assert "clip '00001/0002': frames are 30x30" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_repeated_signal_does_not_break_the_cleanup(tmp_path, vimeo, sig):
    import signal
    import time

    cfg = yaml.safe_load(open(write_config(tmp_path / "c.yaml", vimeo, tmp_path / "run", iterations=100000)))
    cfg["data"]["num_workers"] = 2
    cfg["data"].pop("val")
    cfg["logging"]["save_every"] = 1000
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "megan_fast", "train", "--config", str(tmp_path / "c.yaml"),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (tmp_path / "run" / "config.yaml").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    for _ in range(2):  # a double Ctrl-C
        os.killpg(proc.pid, getattr(signal, sig))
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == "SIGINT" else 143), err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert not (tmp_path / "run").exists()  # no checkpoint yet: the start was taken back
