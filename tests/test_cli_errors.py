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


# --------------------------------------------------------------------------- a full disk


def _official_pth(path) -> str:
    from _official import official_state_dict

    import torch

    torch.save(official_state_dict(nf=64, front=1, back=1, groups=8), path)
    return str(path)


@pytest.mark.parametrize("command", ["convert", "eval --json", "eval --save-frames", "upscale"])
def test_a_full_disk_is_one_line_naming_the_output(workspace, command):
    from _media import full_disk_command

    (workspace / "full").mkdir()
    argv = {"convert": ["convert", _official_pth(workspace / "z.pth"), "full/model"],
            "eval --json": ["eval", "--checkpoint", "ckpt", "--data", "gt", "--json", "full/s.json", "--no-baseline"],
            "eval --save-frames": ["eval", "--checkpoint", "ckpt", "--data", "gt", "--save-frames", "full/frames",
                                   "--no-baseline"],
            "upscale": ["upscale", "in.mp4", "full/out.mp4", "--checkpoint", "ckpt"]}[command]
    before = snapshot(workspace)
    res = full_disk_command(str(workspace / "full"), argv, cwd=str(workspace))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    out = next(a for a in argv if a.startswith("full/"))
    assert len([ln for ln in lines if "error:" in ln]) == 1 and lines[-1].endswith(out), res.stderr
    assert "No space left on device" in res.stderr or "File too large" in res.stderr
    assert snapshot(workspace) == before


# --------------------------------------------------------------------------- messages that name the right thing


def test_convert_refuses_an_out_dir_named_like_a_file(workspace, capsys):
    rc = main(["convert", "ckpt", "out.safetensors"])
    err = capsys.readouterr().err
    assert rc == 2 and "OUT_DIR 'out.safetensors': convert writes a folder" in err and len(err.splitlines()) == 1
    assert not (workspace / "out.safetensors").exists()


@pytest.mark.parametrize("value", ["1", "65", "x"])
def test_rate_is_refused_in_the_same_words_by_upscale_and_eval(workspace, capsys, value):
    words = set()
    for argv in (["upscale", "in.mp4", "o.mp4", "--rate", value], ["eval", "--checkpoint", "ckpt", "--data", "gt",
                                                                    "--rate", value]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"expected an integer from 2 to 64, got '{value}'" in err, err
        words.add(err.split("error:")[1].split(" (see")[0])
    assert len(words) == 1


def test_small_tiles_get_a_smaller_default_overlap(workspace, capsys):
    assert main(["upscale", "in.mp4", "o.mp4", "--checkpoint", "ckpt", "--tile", "8"]) == 0
    assert main(["eval", "--checkpoint", "ckpt", "--data", "gt", "--tile", "8", "--no-baseline"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", "ckpt", "--data", "gt", "--tile", "8", "--tile-overlap", "8"]) == 2
    assert "--tile-overlap 8 must be smaller than --tile 8" in capsys.readouterr().err


def test_tile_overlap_without_tile_says_it_does_nothing(workspace, capsys):
    assert main(["upscale", "in.mp4", "o.mp4", "--checkpoint", "ckpt", "--tile-overlap", "4"]) == 0
    err = capsys.readouterr().err
    assert "warning: --tile-overlap does nothing without --tile" in err


def test_compiling_says_it_takes_minutes(workspace, capsys, monkeypatch):
    from megan_fast import inference

    monkeypatch.setattr(inference, "compile_model", lambda model, mode: model)  # the message, not the compile
    assert main(["upscale", "in.mp4", "o.mp4", "--checkpoint", "ckpt", "--compile", "default"]) == 0
    assert "compiling the model (torch.compile, mode default): the first window takes minutes on a CPU" in \
        capsys.readouterr().err
