"""Every megan-fast command that reads or writes files, given what users get wrong.

Each case must give a non-zero exit, exactly one line on stderr, no
traceback, nothing left behind and the inputs untouched.
"""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("av", reason="PyAV is needed for the video inputs")
pytest.importorskip("skimage", reason="scikit-image provides the photos the test clips are made from")

from _media import SMALL, make_video, readonly_command, save_small_model, snapshot  # noqa: E402
from megan_fast.cli.main import main  # noqa: E402
from megan_fast.data import synthetic  # noqa: E402


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with a checkpoint, a video, a clip folder, a training config and a read-only-to-be folder."""
    save_small_model(tmp_path / "ckpt")
    make_video(tmp_path / "in.mp4", frames=5)
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 7, size=(16, 16), seed=0), str(tmp_path / "gt" / "a"))
    cfg = {"name": "t", "output_dir": str(tmp_path / "run"), "model": SMALL,
           "data": {"train": {"type": "folder", "root": str(tmp_path / "gt"), "crop": 2}, "batch_size": 1,
                    "num_workers": 0},
           "optim": {"iterations": 1}, "logging": {"tensorboard": False}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    bad = tmp_path / "bad_ckpt"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x13" * 64)
    planted = tmp_path / "bad_run" / "checkpoints"
    planted.mkdir(parents=True)
    (planted / "iter_1.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp_path / "ro").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _commands(ws) -> dict[str, dict[str, list[str]]]:
    return {
        "corrupt checkpoint": {
            "demo": ["demo", "--checkpoint", "bad_ckpt", "--output", "demo_out", "--no-bench"],
            "upscale": ["upscale", "in.mp4", "out.mp4", "--checkpoint", "bad_ckpt"],
            "eval": ["eval", "--checkpoint", "bad_ckpt", "--data", "gt", "--json", "s.json"],
            "train": ["train", "--config", "train.yaml", "--output-dir", "bad_run", "--resume", "--device", "cpu"],
        },
        "missing file": {
            "demo": ["demo", "--checkpoint", "no_ckpt", "--output", "demo_out", "--no-bench"],
            "upscale": ["upscale", "missing.mp4", "out.mp4", "--checkpoint", "ckpt"],
            "eval": ["eval", "--checkpoint", "ckpt", "--data", "no_data", "--json", "s.json"],
            "train": ["train", "--config", "no_config.yaml"],
        },
        "read-only output folder": {
            "demo": ["demo", "--checkpoint", "ckpt", "--output", "ro/demo", "--no-bench", "--size", "16x16"],
            "upscale": ["upscale", "in.mp4", "ro/out.mp4", "--checkpoint", "ckpt"],
            "eval": ["eval", "--checkpoint", "ckpt", "--data", "gt", "--json", "ro/s.json"],
            "train": ["train", "--config", "train.yaml", "--output-dir", "ro/run", "--device", "cpu"],
        },
    }


def _check(rc: int, err: str, before: dict, ws, what: str) -> None:
    assert rc != 0, what
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], (what, err)
    assert "Traceback" not in err, (what, err)
    assert snapshot(ws) == before, f"{what}: files changed or were left behind"


@pytest.mark.parametrize("scenario", ["corrupt checkpoint", "missing file"])
@pytest.mark.parametrize("command", ["demo", "upscale", "eval", "train"])
def test_every_command_fails_cleanly(workspace, capsys, scenario, command):
    argv = _commands(workspace)[scenario][command]
    before = snapshot(workspace)
    rc = main(argv)
    _check(rc, capsys.readouterr().err, before, workspace, f"{scenario}: {' '.join(argv)}")


@pytest.mark.parametrize("command", ["demo", "upscale", "eval", "train"])
def test_every_command_fails_cleanly_on_a_read_only_folder(workspace, command):
    argv = _commands(workspace)["read-only output folder"][command]
    before = snapshot(workspace)
    res = readonly_command(str(workspace / "ro"), argv, cwd=str(workspace))
    if res is None:
        pytest.skip("this machine cannot make a read-only folder for the test (root without mount namespaces)")
    _check(res.returncode, res.stderr, before, workspace, f"read-only: {' '.join(argv)}")
    assert "cannot write in" in res.stderr and ("Read-only file system" in res.stderr or "ermission" in res.stderr)


def _checkpoint_variants(ws) -> dict[str, tuple[str, str]]:
    """name -> (folder, expected words): every way a checkpoint folder goes wrong."""
    good_cfg = json.loads((ws / "ckpt" / "config.json").read_text())
    weights = (ws / "ckpt" / "model.safetensors").read_bytes()
    variants = {
        "corrupt weights": ({"model.safetensors": b"\x13" * 64}, "not a readable safetensors file"),
        "truncated weights": ({"model.safetensors": weights[: len(weights) // 2]}, "not a readable safetensors file"),
        "empty weights": ({"model.safetensors": b""}, "not a readable safetensors file"),
        "unknown field": ({"config.json": json.dumps({**good_cfg, "nff": 3})}, "unknown field 'nff'"),
        "mistyped field": ({"config.json": json.dumps({**good_cfg, "nf": "8"})}, "nf must be an integer"),
        "negative field": ({"config.json": json.dumps({**good_cfg, "back_blocks": -2})}, "back_blocks must be >= 0"),
        "bool for an int": ({"config.json": json.dumps({**good_cfg, "tau": True})}, "tau must be an integer"),
        "wrong JSON": ({"config.json": "{nf: 8"}, "not a readable JSON file"),
        "JSON list": ({"config.json": "[1, 2]"}, "expected a mapping"),
        "weights of another config": ({"config.json": json.dumps({**good_cfg, "nf": 16, "deformable_groups": 2})},
                                      "do not fit this model's config"),
        "missing weights": ({"model.safetensors": None}, "model.safetensors not found"),
    }
    out = {}
    for name, (files, words) in variants.items():
        folder = ws / ("ckpt_" + name.replace(" ", "_"))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(good_cfg))
        (folder / "model.safetensors").write_bytes(weights)
        for fname, content in files.items():
            if content is None:
                (folder / fname).unlink()
            elif isinstance(content, bytes):
                (folder / fname).write_bytes(content)
            else:
                (folder / fname).write_text(content)
        out[name] = (folder.name, words)
    return out


def test_every_bad_checkpoint_is_one_line_naming_the_file(workspace, capsys):
    for name, (folder, words) in _checkpoint_variants(workspace).items():
        before = snapshot(workspace)
        rc = main(["upscale", "in.mp4", "out.mp4", "--checkpoint", folder])
        err = capsys.readouterr().err
        _check(rc, err, before, workspace, name)
        assert words in err and folder in err and "--checkpoint" in err, (name, err)
