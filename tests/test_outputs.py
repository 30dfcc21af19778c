"""megan_fast.outputs: the output-path rules, marks, atomic files and folders, strict JSON."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megan_fast import outputs
from megan_fast.images import write_png
from megan_fast.outputs import Kind, OutputError, check_output

FILE = Kind("JSON file")
FRAMES = Kind("folder of PNG frames", folder=True, entries=r"\d{6}\.png")


def test_empty_and_working_folder_paths_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("", "  ", None):
        with pytest.raises(OutputError, match="--json is empty"):
            check_output(path, "--json", FILE)
    for path in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(OutputError, match="working folder"):
            check_output(path, "OUTPUT", FRAMES, overwrite=True)


def test_output_may_not_be_contain_or_lie_inside_an_input(tmp_path):
    data = tmp_path / "data"
    (data / "clip").mkdir(parents=True)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    inputs = [("--data", str(data)), ("INPUT", str(video)), ("--lq", None)]
    cases = [(video, "is the input INPUT"), (data, "is the input --data"),
             (data / "clip" / "out.json", "lies inside the input --data"), (tmp_path, "contains the input")]
    for path, message in cases:
        with pytest.raises(OutputError, match=message):
            check_output(str(path), "OUTPUT", FILE, inputs=inputs, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(OutputError, match="lies inside the input --data"):
        check_output(str(link / "x.json"), "OUTPUT", FILE, inputs=inputs)
    assert check_output(str(tmp_path / "data_out.json"), "OUTPUT", FILE, inputs=inputs).path == \
        str(tmp_path / "data_out.json")


def test_existing_outputs_need_overwrite_and_must_be_ours(tmp_path):
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps({"clips": {}}))
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        check_output(str(theirs), "--json", FILE)
    with pytest.raises(OutputError, match="not a JSON file that megan-fast wrote"):
        check_output(str(theirs), "--json", FILE, overwrite=True)
    ours = tmp_path / "ours.json"
    outputs.write_json({"a": 1}, check_output(str(ours), "--json", FILE), "eval")
    assert outputs.is_ours(str(ours)) and json.loads(ours.read_text())["written_by"].startswith("megan-fast ")
    outputs.write_json({"a": 2}, check_output(str(ours), "--json", FILE, overwrite=True), "eval")
    assert json.loads(ours.read_text())["a"] == 2
    with pytest.raises(OutputError, match="is a file, but a folder"):
        check_output(str(ours), "OUTPUT", FRAMES, overwrite=True)
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(OutputError, match="is a folder, but a JSON file"):
        check_output(str(tmp_path / "adir.json"), "--json", FILE, overwrite=True)
    (tmp_path / "link.json").symlink_to(ours)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(str(tmp_path / "link.json"), "--json", FILE, overwrite=True)


def test_a_folder_is_replaced_only_if_every_entry_is_ours(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        write_png(torch.zeros(3, 2, 2), str(folder / f"{i:06d}.png"))
    out = check_output(str(folder), "OUTPUT", FRAMES, overwrite=True)
    with out.atomic_folder() as tmp:
        write_png(torch.ones(3, 2, 2), os.path.join(tmp, "000000.png"))
    assert os.listdir(folder) == ["000000.png"]  # the old folder was replaced as a whole
    assert [n for n in os.listdir(tmp_path) if n.startswith(outputs.TMP_PREFIX)] == []
    (folder / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(OutputError, match="'holiday.jpg' is not"):
        check_output(str(folder), "OUTPUT", FRAMES, overwrite=True)
    (folder / "holiday.jpg").unlink()
    (folder / "000001.png").write_bytes(b"a PNG name, but not a PNG megan-fast wrote")
    with pytest.raises(OutputError, match="'000001.png' is not"):
        check_output(str(folder), "OUTPUT", FRAMES, overwrite=True)


def test_atomic_file_leaves_nothing_on_failure_and_rechecks_at_the_end(tmp_path):
    target = tmp_path / "o.json"
    out = check_output(str(target), "--json", FILE)
    with pytest.raises(RuntimeError):
        with out.atomic_file() as tmp:
            assert os.path.basename(tmp).startswith(outputs.TMP_PREFIX) and tmp.endswith(".json")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    # A file of the user's appears at the target while we work: it is not replaced.
    with pytest.raises(OutputError, match="exists"):
        with out.atomic_file() as tmp:
            target.write_text("the user's")
    assert target.read_text() == "the user's" and os.listdir(tmp_path) == ["o.json"]


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        assert outputs.umask() == 0o077
        with check_output(str(tmp_path / "f.json"), "--json", FILE).atomic_file() as tmp:
            open(tmp, "w").close()
        with check_output(str(tmp_path / "d"), "OUTPUT", FRAMES).atomic_folder():
            pass
        os.umask(0o022)
        with check_output(str(tmp_path / "g.json"), "--json", FILE).atomic_file() as tmp:
            open(tmp, "w").close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f.json").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "g.json").st_mode & 0o777 == 0o644  # not tempfile's 0600


def test_parents_must_exist_unless_made(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        check_output(str(tmp_path / "a" / "b.json"), "--json", FILE)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output(str(tmp_path / "file" / "b.json"), "--json", FILE)
    run = Kind("training run folder", folder=True)
    out = check_output(str(tmp_path / "runs" / "deep" / "x"), "output_dir", run, existing="keep", make_parents=True)
    assert out.path == str(tmp_path / "runs" / "deep" / "x") and not (tmp_path / "runs").exists()


def test_strict_json():
    text = outputs.dumps({"clips": {"a": {"psnr_y": float("inf"), "ssim_y": 1.0}}, "loss": float("nan"),
                          "list": [1.0, float("-inf")]})

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=refuse)
    assert data["clips"]["a"]["psnr_y"] is None and data["loss"] is None and data["list"] == [1.0, None]
    assert data["clips"]["a"]["ssim_y"] == 1.0
    assert any("clips.a.psnr_y was inf" in n for n in data["notes"]) and len(data["notes"]) == 3


def test_marks_are_recognised_by_format(tmp_path):
    write_png(torch.zeros(3, 2, 2), str(tmp_path / "a.png"))
    from PIL import Image

    Image.new("RGB", (2, 2)).save(tmp_path / "b.png")
    (tmp_path / "c.json").write_text("not json")
    (tmp_path / "d.yaml").write_text("# megan-fast 0.1.0 train: the resolved config\nname: x\n")
    (tmp_path / "e.yaml").write_text("name: x\n")
    assert outputs.is_ours(str(tmp_path / "a.png")) and not outputs.is_ours(str(tmp_path / "b.png"))
    assert not outputs.is_ours(str(tmp_path / "c.json")) and not outputs.is_ours(str(tmp_path / "missing.png"))
    assert outputs.is_ours(str(tmp_path / "d.yaml")) and not outputs.is_ours(str(tmp_path / "e.yaml"))


def test_a_failed_swap_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    write_png(torch.zeros(3, 2, 2), str(folder / "000000.png"))
    before = (folder / "000000.png").read_bytes()
    out = check_output(str(folder), "OUTPUT", FRAMES, overwrite=True)
    real_rename = os.rename
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder cannot take the old one's place
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError):
        with out.atomic_folder() as tmp:
            write_png(torch.ones(3, 2, 2), os.path.join(tmp, "000000.png"))
    monkeypatch.undo()
    assert (folder / "000000.png").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["frames"]


def test_only_our_temporary_names_are_taken_for_leftovers(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / ".megan-fast-a1b2c3d4.png").write_bytes(b"")  # tempfile's name shape: a killed run's leftover
    assert FRAMES.foreign(str(folder)) is None
    (folder / ".megan-fast-notes").write_text("the user's own dotfile")
    assert FRAMES.foreign(str(folder)) == str(folder / ".megan-fast-notes")


def test_a_folder_named_like_our_temporary_is_ours_only_if_its_contents_are(tmp_path):
    folder = tmp_path / "frames"
    (folder / ".megan-fast-a1b2c3d4").mkdir(parents=True)
    (folder / ".megan-fast-a1b2c3d4" / "thesis.pdf").write_bytes(b"the user's")
    assert FRAMES.foreign(str(folder)) == str(folder / ".megan-fast-a1b2c3d4")
    (folder / ".megan-fast-a1b2c3d4" / "thesis.pdf").unlink()
    write_png(torch.zeros(3, 2, 2), str(folder / ".megan-fast-a1b2c3d4" / "000000.png"))
    assert FRAMES.foreign(str(folder)) is None
