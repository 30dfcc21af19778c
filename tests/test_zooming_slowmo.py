"""Zooming Slow-Mo as a member of the model family, and its official checkpoint format.

The official network is written out a second time in tests/_official.py,
independently of megan_fast.models; our model, given the same file through
``load_model``, must compute the same frames.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from _models import TINY_MEGAN, TINY_SIZES
from _official import assert_native_equals_reference, official_forward, official_shapes, official_state_dict
from megan_fast.cli.main import main
from megan_fast.errors import CheckpointError
from megan_fast.models import MEGAN, MEGANConfig, load_model

torchvision = pytest.importorskip("torchvision")


SMALL = dict(nf=64, front=2, back=1, groups=8)  # nf 64: the official upconv2, HRconv and conv_last are 64 wide for any nf


def save_official(path, prefix="", **sizes) -> str:
    state = official_state_dict(**{**SMALL, **sizes})
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return str(path)


def tiny_folder_with_config_edit(tmp_path, old: str, new: str) -> str:
    """A tiny Zooming Slow-Mo model folder of ours whose config.json has ``old`` replaced by ``new``."""
    folder = tmp_path / "zsm"
    MEGAN(MEGANConfig.zooming_slowmo(**TINY_SIZES)).save_pretrained(folder)
    cfg = folder / "config.json"
    assert old in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(old, new))
    return str(folder)


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- the released file's format


def test_the_official_key_list_is_the_released_files():
    shapes = official_shapes()
    assert len(shapes) == 416
    assert sum(int(torch.tensor(s).prod()) for s in shapes.values()) == 11_102_771
    model = MEGAN(MEGANConfig.zooming_slowmo())
    assert sum(p.numel() for p in model.parameters()) == 11_102_771 and len(model.state_dict()) == 416


def test_the_full_size_official_state_dict_loads_strictly(tmp_path):
    state = {k: torch.zeros(s) for k, s in official_shapes().items()}
    torch.save(state, tmp_path / "xiang2020zooming.pth")
    model = load_model(tmp_path / "xiang2020zooming.pth")
    assert model.config == MEGANConfig.zooming_slowmo() and not model.training


@pytest.mark.parametrize("size", [(12, 16), (10, 13)])
def test_our_forward_equals_the_official_one(tmp_path, size):
    path = save_official(tmp_path / "z.pth")
    model = load_model(path)
    sd = torch.load(path, weights_only=True)
    x = torch.rand(1, 3, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, official = model(x), official_forward(sd, x, SMALL["groups"])
    assert ours.shape == official.shape == (1, 5, 3, 4 * size[0], 4 * size[1])
    assert rel_l2(ours, official) < 1e-5


def test_any_number_of_input_frames_and_a_dataparallel_save(tmp_path):
    path = save_official(tmp_path / "z.pth", prefix="module.")
    model = load_model(path)
    sd = {k.removeprefix("module."): v for k, v in torch.load(path, weights_only=True).items()}
    for n in (2, 5):
        x = torch.rand(2, n, 3, 8, 8)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 2 * n - 1, 3, 32, 32)
        assert rel_l2(out, official_forward(sd, x, SMALL["groups"])) < 1e-5
    with pytest.raises(ValueError, match="n >= 2"):
        model(torch.rand(1, 1, 3, 8, 8))


def test_convert_round_trips_with_the_same_frames(tmp_path, capsys):
    path = save_official(tmp_path / "z.pth")
    assert main(["convert", path, str(tmp_path / "ours")]) == 0
    assert "Zooming Slow-Mo" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
    x = torch.rand(1, 3, 3, 8, 12)
    with torch.no_grad():
        a, b = load_model(path)(x), MEGAN.from_pretrained(tmp_path / "ours").eval()(x)
    assert torch.equal(a, b)
    assert main(["convert", path, str(tmp_path / "ours")]) == 2  # exists: needs --overwrite
    assert main(["convert", path, str(tmp_path / "ours"), "--overwrite"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert main(["convert", path, str(tmp_path / "mine"), "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".megan-fast-")] == []


# --------------------------------------------------------------------------- files that are not it


def test_a_mismatched_state_dict_names_what_differs(tmp_path):
    state = official_state_dict(**SMALL)
    del state["upconv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["conv_last.bias"] = torch.zeros(4)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.pth")
    msg = str(info.value)
    assert "1 missing ('upconv1.weight')" in msg and "1 unexpected ('extra.weight')" in msg
    assert "conv_last.bias: (4,) vs (3,)" in msg and "\n" not in msg


def test_a_pickle_with_objects_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv_first.weight": Planted()}, tmp_path / "planted.pth")
    with pytest.raises(CheckpointError, match=r"holds Python objects \(io.open\), which are not loaded"):
        load_model(tmp_path / "planted.pth")
    assert not marker.exists()
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"a": Planted()}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "plain.pth")
    assert not marker.exists()


def test_truncated_empty_and_non_dict_files(tmp_path):
    path = save_official(tmp_path / "z.pth")
    data = open(path, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"conv_first.weight": [1, 2]}, tmp_path / "entry.pth")
    for name, needle in (("cut.pth", "not a readable PyTorch weights file"),
                         ("empty.pth", "not a readable PyTorch weights file"),
                         ("list.pth", "expected a state dict"), ("entry.pth", "'conv_first.weight' is a list")):
        with pytest.raises(CheckpointError, match=needle):
            load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pth")


def test_a_megan_checkpoint_is_not_taken_for_the_other_architecture(tmp_path):
    torch.save(MEGAN(**TINY_SIZES, num_pfrdb=1).state_dict(),
               tmp_path / "megan.pth")
    with pytest.raises(CheckpointError, match="own names without its config.json"):
        load_model(tmp_path / "megan.pth")
    # and our folder of the Zooming Slow-Mo config is not a MEGAN one
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tiny_folder_with_config_edit(tmp_path, '"lmga": false', '"lmga": true'))


# --------------------------------------------------------------------------- the commands take a .pth


def test_upscale_eval_and_demo_take_the_pth_directly(tmp_path, capsys):
    pytest.importorskip("av")
    from _media import grey_frames

    path = save_official(tmp_path / "z.pth")
    frames = grey_frames(tmp_path / "frames", [30 * i for i in range(5)], h=8, w=8, name="{i:03d}.png")
    assert main(["upscale", frames, str(tmp_path / "up"), "--checkpoint", path]) == 0
    assert len(os.listdir(tmp_path / "up")) == 9
    data = tmp_path / "clips"
    grey_frames(data / "clip", [20 * i for i in range(7)], h=32, w=32, name="{i:03d}.png")
    assert main(["eval", "--checkpoint", path, "--data", str(data), "--json", str(tmp_path / "e.json"),
                 "--no-baseline"]) == 0
    pytest.importorskip("skimage", reason="the demo films a scikit-image photo")
    assert main(["demo", "--checkpoint", path, "--output", str(tmp_path / "demo"), "--size", "32x32",
                 "--no-bench", "--device", "cpu"]) == 0
    assert "z.pth" in capsys.readouterr().out


# --------------------------------------------------------------------------- each switch of the preset


@pytest.mark.parametrize("switch", [dict(nonlocal_blocks=False), dict(lmga=False), dict(num_pfrdb=0)])
def test_each_switch_native_equals_reference(switch):
    torch.manual_seed(0)
    model = MEGAN(**{**TINY_MEGAN, "num_input_frames": 3, **switch}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(1, 3, 3, 8, 8, dtype=torch.float64)
    assert_native_equals_reference(
        model, lambda m: m(x, memory_indices=[0, 2]) if m.lmga is not None else m(x))
    names = set(model.state_dict())
    assert (not any(n.startswith("features.nonlocal") for n in names)) == (not model.config.nonlocal_blocks)
    assert (not any(n.startswith("lmga.") for n in names)) == (not model.config.lmga)


def test_preset_config_round_trips_and_is_checked(tmp_path):
    cfg = MEGANConfig.zooming_slowmo()
    assert MEGANConfig.from_dict(cfg.__dict__) == cfg
    with pytest.raises(Exception, match="pad_mode must be 'replicate' or 'zeros'"):
        MEGANConfig(pad_mode="reflect")
    with pytest.raises(Exception, match="lmga must be"):
        MEGANConfig(lmga=1)


def test_files_a_model_cannot_use_are_refused(tmp_path):
    base = official_state_dict(**SMALL)
    cases = {
        # block counts come from the indices whose first conv is a block's weight, not a model of 3,000,001
        # blocks: the stray one is an unexpected tensor
        "stray_index": ({**base, "recon_trunk.3000000.conv1.weight": torch.zeros(1)},
                        r"tensors 1 unexpected \('recon_trunk.3000000.conv1.weight'\)$"),
        "int": ({**base, "conv_first.weight": base["conv_first.weight"].long()}, "dtype int64, not floating point"),
        "complex": ({**base, "conv_first.bias": base["conv_first.bias"].to(torch.complex64)}, "dtype complex64, not floating point"),
        "sparse": ({**base, "conv_first.bias": base["conv_first.bias"].to_sparse()}, "is a torch.sparse_coo tensor; expected plain dense"),
        "meta": ({**base, "conv_first.bias": torch.empty(64, device="meta")}, "is a meta tensor \\(shapes without values\\)"),
        "f64_overflow": ({**base, "conv_first.bias": base["conv_first.bias"].double().index_fill(0, torch.tensor([0]),
                                                                                                 1e300)},
                         r"NaN or infinite weights \(e.g. 'conv_first.bias'\) in float32"),
        "huge_nf": ({**base, "conv_first.weight": torch.empty(10**9, 0, 3, 3)}, "of another shape"),
        "nested": ({"state_dict": base}, "a training checkpoint"),
        "int_key": ({3: torch.zeros(1)}, "key 3 is a int"),
    }
    for name, (state, needle) in cases.items():
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=needle):
            load_model(tmp_path / f"{name}.pth")
    folder = tiny_folder_with_config_edit(tmp_path, '"back_blocks": 1', '"back_blocks": 100000000')
    with pytest.raises(CheckpointError, match="more blocks than model.safetensors has tensors"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="give the folder"):
        load_model(os.path.join(folder, "model.safetensors"))


def test_overwrite_never_replaces_another_commands_file(tmp_path, capsys):
    path = save_official(tmp_path / "z.pth")
    assert main(["convert", path, str(tmp_path / "m")]) == 0
    before = (tmp_path / "m" / "config.json").read_text()
    data = tmp_path / "clips"
    from _media import grey_frames

    grey_frames(data / "clip", [20 * i for i in range(7)], h=16, w=16, name="{i:03d}.png")
    # an eval JSON may replace an eval JSON, never a model's config.json
    assert main(["eval", "--checkpoint", path, "--data", str(data), "--json", str(tmp_path / "m" / "config.json"),
                 "--overwrite", "--no-baseline"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert (tmp_path / "m" / "config.json").read_text() == before
    for argv in (["upscale", str(data / "clip"), str(tmp_path / "up"), "--checkpoint", ""],
                 ["demo", "--checkpoint", "", "--output", str(tmp_path / "d")], ["convert", "", str(tmp_path / "c")]):
        assert main(argv) == 2
        assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "up").exists() and not (tmp_path / "d").exists() and not (tmp_path / "c").exists()
