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
