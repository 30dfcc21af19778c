"""TMNet (temporal modulation: in-between frames at any time) as a member of the model family.

The official network is written out independently in tests/_official.py; our
model, given the same file through ``load_model``, must compute the same
frames at every number of times.
"""

from __future__ import annotations

import os

import pytest
import torch

from _models import TINY_MEGAN, TINY_SIZES
from _official import assert_native_equals_reference, official_forward, official_shapes, official_state_dict
from megan_fast.cli.main import main
from megan_fast.errors import CheckpointError
from megan_fast.models import MEGAN, MEGANConfig, load_model
from megan_fast.models.baseline import bicubic_blend
from megan_fast.models.official import official_names

torchvision = pytest.importorskip("torchvision")

SMALL = dict(nf=64, front=2, back=1, groups=8, tmnet=True)  # TMNet's added layers are 64 wide for any nf
TINY = TINY_SIZES


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


def save_official(path, **sizes) -> str:
    torch.save(official_state_dict(**{**SMALL, **sizes}), path)
    return str(path)


# --------------------------------------------------------------------------- the released files' format


def test_the_official_key_list_is_the_released_files():
    shapes = official_shapes(tmnet=True)
    assert len(shapes) == 482
    assert sum(int(torch.tensor(s).prod()) for s in shapes.values()) == 12_263_523
    model = MEGAN(MEGANConfig.tmnet())
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 12_263_523 and len(own) == 482
    names = official_names(tmnet=True)
    assert set(names) == set(shapes) and sorted(names.values()) == sorted(own)
    assert all(own[names[k]] == s for k, s in shapes.items())


@pytest.mark.parametrize("name", ["tmnet_single_frame.pth", "tmnet_multiple_frames.pth"])
def test_the_full_size_official_state_dicts_load_strictly_and_round_trip(tmp_path, name):
    state = {k: torch.full(s, 0.01) for k, s in official_shapes(tmnet=True).items()}
    torch.save(state, tmp_path / name)
    model = load_model(tmp_path / name)
    assert model.config == MEGANConfig.tmnet() and not model.training
    names = official_names(tmnet=True)
    back = {k: model.state_dict()[names[k]] for k in state}
    assert all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("times", [[0.5], [1 / 3, 2 / 3], [0.1, 0.25, 0.4, 0.6, 0.9]], ids=["k1", "k2", "k5"])
def test_our_forward_equals_the_official_one(tmp_path, times):
    path = save_official(tmp_path / "tmnet.pth")
    model = load_model(path)
    sd = torch.load(path, weights_only=True)
    x = torch.rand(1, 3, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    k = len(times)
    with torch.no_grad():
        ours = model(x, times=times)
        official = official_forward(sd, x, 8, t=torch.tensor([times]))
    assert ours.shape == official.shape == (1, 3 + 2 * k, 3, 48, 64)
    assert rel_l2(ours, official) < 1e-5


def test_times_as_a_tensor_row_per_sample(tmp_path):
    path = save_official(tmp_path / "tmnet.pth")
    model = load_model(path)
    sd = torch.load(path, weights_only=True)
    x = torch.rand(2, 2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([[0.2, 0.7], [0.4, 0.5]])
    with torch.no_grad():
        ours = model(x, times=t)
        assert rel_l2(ours, official_forward(sd, x, 8, t=t)) < 1e-5
        for i in range(2):
            torch.testing.assert_close(ours[i:i + 1], model(x[i:i + 1], times=t[i].tolist()), rtol=1e-5, atol=1e-6)


def test_convert_writes_ours_with_the_same_frames(tmp_path, capsys):
    path = save_official(tmp_path / "tmnet.pth")
    assert main(["convert", path, str(tmp_path / "ours")]) == 0
    assert "TMNet" in capsys.readouterr().out
    x = torch.rand(1, 2, 3, 8, 8)
    with torch.no_grad():
        a = load_model(path)(x, times=[0.25, 0.75])
        b = MEGAN.from_pretrained(tmp_path / "ours").eval()(x, times=[0.25, 0.75])
    assert torch.equal(a, b)


def test_a_zooming_slowmo_file_is_not_taken_for_tmnet_and_back(tmp_path):
    state = official_state_dict(**SMALL)
    del state["layersFusion.6.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"not the TMNet network: tensors 1 missing \('layersFusion.6.weight'\)"):
        load_model(tmp_path / "partial.pth")


# --------------------------------------------------------------------------- times


def test_times_are_checked_with_one_clear_message():
    model = MEGAN(MEGANConfig.tmnet(**TINY)).eval()
    x = torch.rand(1, 2, 3, 8, 8)
    bad = {
        "empty": ([], "non-empty list"),
        "unsorted": ([0.6, 0.3], "must increase"),
        "repeated": ([0.5, 0.5], "must increase"),
        "zero": ([0.0], "strictly between 0 and 1"),
        "one": ([1.0], "strictly between 0 and 1"),
        "nan": ([float("nan")], "strictly between 0 and 1"),
        "bool": ([True], "strictly between 0 and 1"),
        "string": ("0.5", "non-empty list"),
        "tensor_1d": (torch.tensor([0.5]), r"shape \(b, k\)"),
        "tensor_batch": (torch.tensor([[0.5], [0.5]]), r"shape \(b, k\)"),
        "tensor_int": (torch.tensor([[1]]), "floating point"),
        "tensor_range": (torch.tensor([[0.5, 1.5]]), "strictly between 0 and 1"),
        "tensor_order": (torch.tensor([[0.5, 0.2]]), "increase along each row"),
    }
    for name, (times, needle) in bad.items():
        with pytest.raises(ValueError, match=needle):
            model(x, times=times)


@pytest.mark.parametrize("preset", ["megan", "zooming_slowmo"])
def test_models_without_time_modulation_take_only_the_halfway_frame(preset):
    cfg = (MEGANConfig(num_input_frames=2, num_pfrdb=1, nonlocal_inner=4, graph_hidden=4, tau=2, **TINY)
           if preset == "megan" else MEGANConfig.zooming_slowmo(**TINY))
    model = MEGAN(cfg).eval()
    x = torch.rand(1, 2, 3, 8, 8)
    with torch.no_grad():
        base = model(x)
        assert torch.equal(model(x, times=[0.5]), base) and torch.equal(model(x, times=torch.tensor([[0.5]])), base)
    for times in ([0.25], [0.25, 0.5], torch.tensor([[0.3]])):
        with pytest.raises(ValueError, match=r"only the frame halfway between two inputs \(times=\[0.5\]\)"):
            model(x, times=times)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_output_order_and_count(n, k):
    # With the global skip and its zero-initialised last conv, the untrained network outputs exactly the
    # baseline: frame i*(k+1) is input i upscaled, frame i*(k+1)+j the blend at time t_j.
    model = MEGAN(MEGANConfig.tmnet(global_skip=True, **TINY)).eval()
    x = torch.rand(1, n, 3, 4, 4, generator=torch.Generator().manual_seed(n))
    times = [(j + 1) / (k + 1) for j in range(k)]
    with torch.no_grad():
        out = model(x, times=times)
    assert out.shape == (1, n + (n - 1) * k, 3, 16, 16)
    up = bicubic_blend(x, times)
    torch.testing.assert_close(out, up, rtol=0, atol=1e-6)
    plain = bicubic_blend(x)  # (1, 2n - 1, ...): inputs at even positions
    for i in range(n):
        torch.testing.assert_close(out[:, i * (k + 1)], plain[:, 2 * i], rtol=0, atol=1e-6)
    for i in range(n - 1):
        for j, t in enumerate(times):
            want = (1 - t) * plain[:, 2 * i] + t * plain[:, 2 * i + 2]
            torch.testing.assert_close(out[:, i * (k + 1) + j + 1], want, rtol=0, atol=1e-5)


def test_native_equals_reference_forward_and_gradients():
    torch.manual_seed(0)
    model = MEGAN(MEGANConfig.tmnet(**TINY)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(1, 2, 3, 8, 8, dtype=torch.float64)
    grads = assert_native_equals_reference(model, lambda m: m(x, times=[0.3, 0.6]))
    assert all(g.abs().sum() > 0 for g in grads[:3])


def test_preset_round_trips_and_saves(tmp_path):
    cfg = MEGANConfig.tmnet()
    assert MEGANConfig.from_dict(cfg.__dict__) == cfg and cfg.family_name == "TMNet"
    model = MEGAN(MEGANConfig.tmnet(**TINY))
    model.save_pretrained(tmp_path / "m")
    again = MEGAN.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]


# --------------------------------------------------------------------------- any frame rate: inference and commands


def tiny_tmnet(path, **overrides) -> str:
    torch.manual_seed(0)
    MEGAN(MEGANConfig.tmnet(num_input_frames=3, **TINY, **overrides)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("rate", [3, 4])
def test_every_output_frame_once_at_any_rate(rate):
    # The global-skip model's output is the baseline exactly: each frame is known, in order, windows or not.
    from megan_fast.inference import upscale_frames

    model = MEGAN(MEGANConfig.tmnet(num_input_frames=3, global_skip=True, **TINY)).eval()
    times = [i / rate for i in range(1, rate)]
    for t in (3, 4, 5, 6, 8):  # one window, a last window aligned to the end, several windows
        x = torch.rand(t, 3, 4, 4, generator=torch.Generator().manual_seed(t))
        out = upscale_frames(model, x, rate=rate, batch=2)
        assert out.shape[0] == rate * (t - 1) + 1
        torch.testing.assert_close(out, bicubic_blend(x.unsqueeze(0), times)[0], rtol=0, atol=1e-6)
    for bad in (1, 65, 2.0, True):
        with pytest.raises(ValueError, match="rate must be an integer from 2 to 64"):
            upscale_frames(model, x, rate=bad)
    zsm = MEGAN(MEGANConfig.zooming_slowmo(**TINY)).eval()
    with pytest.raises(ValueError, match="rate 4 needs a model that makes frames at any time"):
        upscale_frames(zsm, x, rate=4)


def test_upscale_rate_4_keeps_audio_and_timing(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from _media import audio_packets, decoded, make_video

    from megan_fast import video

    ckpt = tiny_tmnet(tmp_path / "tm")
    times = [0.0, 0.1, 0.2, 0.4, 0.5]  # one gap twice as long: the in-between frames follow it
    src = make_video(tmp_path / "in.mkv", frames=5, fps=10, audio=True, times=times)
    out = str(tmp_path / "x4.mkv")
    assert main(["upscale", src, out, "--checkpoint", ckpt, "--rate", "4", "--device", "cpu"]) == 0
    got, _ = decoded(out)
    want = [a + (b - a) * j / 4 for a, b in zip(times, times[1:]) for j in range(4)] + [times[-1]]
    assert len(got) == 17 and got == pytest.approx(want, abs=1e-3)
    assert video.probe(out).fps == 40
    assert audio_packets(out) == audio_packets(src)
    assert "-> 17 frames (64x48, 40 fps)" in capsys.readouterr().out


def test_upscale_and_eval_refuse_a_rate_the_model_cannot_make(tmp_path, capsys):
    from _media import grey_frames, save_small_model

    frames = grey_frames(tmp_path / "frames", [30 * i for i in range(5)], h=8, w=8, name="{i:03d}.png")
    megan = save_small_model(tmp_path / "megan")
    for argv in (["upscale", frames, str(tmp_path / "up"), "--checkpoint", megan, "--rate", "3"],
                 ["eval", "--checkpoint", megan, "--data", str(tmp_path), "--rate", "3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("--rate 3 needs a model that makes frames at any time (TMNet); this MEGAN model makes "
                            "only the halfway frame (rate 2)") and "\n" not in err
    with pytest.raises(SystemExit) as info:
        main(["upscale", frames, str(tmp_path / "up"), "--rate", "1"])
    assert info.value.code == 2 and "argument --rate: expected an integer from 2 to 64" in capsys.readouterr().err
    # a huge rate is refused at once (the times are not built first), before the model is asked
    for command in (["upscale", frames, str(tmp_path / "up")], ["eval", "--data", str(tmp_path)]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--checkpoint", megan, "--rate", "10" * 10])
        assert info.value.code == 2 and "--rate: expected an integer from 2 to 64" in capsys.readouterr().err
    assert not (tmp_path / "up").exists()


def test_eval_rate_4_scores_every_frame_once_with_per_time_averages(tmp_path, capsys):
    import json

    from megan_fast.data import synthetic

    # n_in 3 at rate 4: windows of 9 ground-truth frames, inputs every 4th; 13 frames -> windows [0, 4].
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 13, size=(16, 16), seed=1), str(tmp_path / "gt" / "a"))
    ckpt = tiny_tmnet(tmp_path / "tm", global_skip=True)  # untrained: exactly the baseline
    out = tmp_path / "s.json"
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "gt"), "--rate", "4", "--json", str(out),
                 "--save-frames", str(tmp_path / "frames"), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    clip, base = report["clips"]["a"], report["baselines"]["bicubic_blend"]["clips"]["a"]
    assert report["rate"] == 4 and clip["frames"] == 13 and len(os.listdir(tmp_path / "frames" / "a")) == 13
    assert {k: v["frames"] for k, v in clip["per_time"].items()} == {"0": 4, "1/4": 3, "1/2": 3, "3/4": 3}
    assert clip["psnr_y"] == pytest.approx(base["psnr_y"])
    for label, score in clip["per_time"].items():
        assert score == pytest.approx(base["per_time"][label])
        assert score == pytest.approx(report["average"]["per_time"][label])
    # inputs are re-made, in-between frames are blends: the inputs score higher
    assert clip["per_time"]["0"]["psnr_y"] > clip["per_time"]["1/2"]["psnr_y"]
    assert "t = 1/4" in capsys.readouterr().out


def test_a_stray_tmnet_tensor_in_a_zooming_slowmo_file_is_named_as_such(tmp_path):
    from _official import official_state_dict as zsm_state

    state = zsm_state(nf=64, front=2, back=1, groups=8)
    state["layersFusion.0.weight"] = torch.zeros(192, 192, 1, 1)
    torch.save(state, tmp_path / "zsm_plus.pth")
    with pytest.raises(CheckpointError, match=r"not the Zooming Slow-Mo network: tensors 1 unexpected "
                                              r"\('layersFusion.0.weight'\)"):
        load_model(tmp_path / "zsm_plus.pth")


def test_times_are_checked_in_the_inputs_dtype_and_take_any_real_number():
    import fractions

    import numpy as np

    model = MEGAN(MEGANConfig.tmnet(**TINY)).eval()
    x = torch.rand(1, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        model(x, times=[0.99999999])  # 1.0 in float32
    with pytest.raises(ValueError, match=r"must increase in bfloat16, the input's dtype .* got 0.5 then 0.5"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(x.bfloat16(), times=[0.5, 0.501])
    with pytest.raises(ValueError, match=r"got a ndarray$"):
        model(x, times=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"floats strictly between 0 and 1, got '0.25'$"):  # a string, shown as one
        model(x, times=["0.25"])
    with pytest.raises(ValueError) as info:
        model(x, times=[1 - i / 10000 for i in range(1, 5000)])
    assert len(str(info.value)) < 200
    with pytest.raises(ValueError, match="dense tensor"):
        model(x, times=torch.tensor([[0.5]]).to_sparse())
    with torch.no_grad():
        a = model(x, times=[np.float32(0.25), fractions.Fraction(1, 2)])
        b = model(x, times=[0.25, 0.5])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eval_rate_on_the_vimeo_layout_makes_the_lr_of_every_frame(tmp_path, capsys):
    import json

    from megan_fast.data import synthetic

    clip = synthetic.make_clip("coffee", 7, size=(16, 16), seed=3)
    synthetic.write_vimeo_layout(str(tmp_path / "vimeo"), {"00001/0001": clip},
                                 lists={"sep_trainlist.txt": ["00001/0001"], "sep_testlist.txt": ["00001/0001"]})
    synthetic.write_clip_folder(clip, str(tmp_path / "folders" / "00001_0001"))
    ckpt = tiny_tmnet(tmp_path / "tm", global_skip=True)
    scores = {}
    for layout in ("vimeo", "folders"):
        out = tmp_path / f"{layout}.json"
        assert main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / layout), "--rate", "3", "--json",
                     str(out), "--device", "cpu"]) == 0
        report = json.loads(out.read_text())
        scores[layout] = next(iter(report["clips"].values()))
    # the septuplet's LR folder holds frames 1, 3, 5, 7 only: at rate 3 the inputs are frames 1, 4, 7
    for label, score in scores["folders"]["per_time"].items():
        assert scores["vimeo"]["per_time"][label] == pytest.approx(score)
    assert scores["vimeo"]["psnr_y"] == pytest.approx(scores["folders"]["psnr_y"])
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "vimeo"), "--lq", str(tmp_path / "vimeo"),
                 "--rate", "3"]) == 2
    assert "LR frames are those of frames 1, 3, 5, 7 only" in capsys.readouterr().err


def test_upscale_refuses_rates_finer_than_a_matroska_millisecond(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from _media import make_video

    ckpt = tiny_tmnet(tmp_path / "tm")
    src = make_video(tmp_path / "in.mp4", frames=4, fps=240, audio=False)
    for ext in ("mkv", "webm"):
        assert main(["upscale", src, str(tmp_path / f"o.{ext}"), "--checkpoint", ckpt, "--rate", "8"]) == 2
        assert f"1920 fps needs timestamps finer than the millisecond that .{ext} stores" in capsys.readouterr().err
        assert not (tmp_path / f"o.{ext}").exists()
    assert main(["upscale", src, str(tmp_path / "o.mp4"), "--checkpoint", ckpt, "--rate", "8", "--device", "cpu"]) == 0


def test_in_between_frames_under_a_millisecond_apart_get_increasing_matroska_timestamps(tmp_path):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from _media import decoded, make_video

    ckpt = tiny_tmnet(tmp_path / "tm")
    src = make_video(tmp_path / "in.mp4", frames=5, audio=False, times=[0, 0.002, 0.1, 0.2, 0.3])
    out = str(tmp_path / "o.mkv")
    assert main(["upscale", src, out, "--checkpoint", ckpt, "--rate", "4", "--device", "cpu"]) == 0
    got, _ = decoded(out)
    want = [a + (b - a) * j / 4 for a, b in zip([0, 0.002, 0.1, 0.2, 0.3], [0.002, 0.1, 0.2, 0.3]) for j in range(4)]
    assert len(got) == 17 and all(b > a for a, b in zip(got, got[1:]))  # 0.5 ms apart: moved a millisecond on
    assert got[5:] == pytest.approx(want[5:] + [0.3], abs=1e-3)  # past the burst, every frame at its own time


# --------------------------------------------------------------------------- clips shorter than a window


def test_two_and_three_frame_clips_are_one_window_for_zooming_slowmo_and_tmnet(tmp_path):
    from megan_fast.inference import upscale_frames

    for model, rate in ((MEGAN(MEGANConfig.zooming_slowmo(global_skip=True, **TINY)).eval(), 2),
                        (MEGAN(MEGANConfig.tmnet(global_skip=True, **TINY)).eval(), 4)):
        for t in (2, 3):
            x = torch.rand(t, 3, 4, 4, generator=torch.Generator().manual_seed(t))
            out = upscale_frames(model, x, rate=rate)
            times = None if rate == 2 else [i / rate for i in range(1, rate)]
            torch.testing.assert_close(out, bicubic_blend(x.unsqueeze(0), times)[0], rtol=0, atol=1e-6)
    megan = MEGAN(**TINY_MEGAN).eval()
    with pytest.raises(ValueError, match=r"the clip has 3 frames; MEGAN takes windows of exactly 4 input frames .* "
                                         r"Zooming Slow-Mo and TMNet take clips of 2 frames or more"):
        upscale_frames(megan, torch.rand(3, 3, 4, 4))
    zsm = MEGAN(MEGANConfig.zooming_slowmo(**TINY)).eval()
    with pytest.raises(ValueError, match=r"the clip has 1 frame; at least 2 are needed"):
        upscale_frames(zsm, torch.rand(1, 3, 4, 4))


def test_upscale_and_eval_take_a_two_frame_clip_with_tmnet(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from _media import decoded, grey_frames, make_video, save_small_model

    from megan_fast.data import synthetic

    ckpt = tiny_tmnet(tmp_path / "tm")
    src = make_video(tmp_path / "two.mp4", frames=2, audio=False)
    assert main(["upscale", src, str(tmp_path / "o.mp4"), "--checkpoint", ckpt, "--rate", "4", "--device", "cpu"]) == 0
    assert len(decoded(str(tmp_path / "o.mp4"))[0]) == 5
    synthetic.write_clip_folder(synthetic.make_clip("coffee", 5, size=(16, 16), seed=0), str(tmp_path / "gt" / "a"))
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "gt"), "--rate", "4"]) == 0
    assert "a " in capsys.readouterr().out
    megan = save_small_model(tmp_path / "megan")
    frames = grey_frames(tmp_path / "frames", [0, 90], h=8, w=8)
    assert main(["upscale", frames, str(tmp_path / "up"), "--checkpoint", megan]) == 2
    err = capsys.readouterr().err
    assert "the clip has 2 frames; MEGAN takes windows of exactly 4 input frames" in err and len(err.splitlines()) == 1
