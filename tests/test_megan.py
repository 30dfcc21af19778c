"""The MEGAN network: size, shapes, backends, gradients, weights I/O, long-clip inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megan_fast.inference import iter_upscale, upscale_frames, window_starts
from megan_fast.errors import CheckpointError
from megan_fast.models import MEGAN, MEGANConfig
from megan_fast.ops import use_backend

SMALL = dict(nf=16, deformable_groups=4, front_blocks=1, back_blocks=1, num_pfrdb=1, nonlocal_inner=8,
             graph_hidden=4, tau=2)


def small(n_in=4, **kw) -> MEGAN:
    torch.manual_seed(0)
    return MEGAN(num_input_frames=n_in, **dict(SMALL, **kw)).eval()


def perturb_zero_inits(model: MEGAN, std=0.05) -> None:
    """Zero-initialised layers (DCN offsets, non-local W_z) hide whole paths: wake them up."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if p.abs().max() == 0:
            p.data.copy_(torch.randn(p.shape, generator=g) * std)


def test_default_config_has_10_66m_parameters():
    n = sum(p.numel() for p in MEGAN().parameters())
    assert abs(n - 10.66e6) / 10.66e6 < 0.02
    assert n == 10_657_651


def test_named_submodules():
    names = [n for n, _ in MEGAN(**SMALL).named_children()]
    assert names == ["features", "interpolation", "convlstm", "lmga", "pfrdbs", "reconstruction"]


@pytest.mark.parametrize("n_in,h,w", [(2, 8, 8), (3, 5, 7), (4, 9, 6)])
def test_output_shapes_any_size(n_in, h, w):
    model = small(n_in)
    with torch.no_grad():
        y = model(torch.rand(2, n_in, 3, h, w))
    assert y.shape == (2, 2 * n_in - 1, 3, 4 * h, 4 * w)


def test_config_round_trips_through_a_dict():
    model = small(3)
    cfg = model.config_dict()
    assert json.loads(json.dumps(cfg)) == cfg
    assert MEGAN(cfg).config == model.config
    assert MEGAN(MEGANConfig(**cfg)).config_dict() == cfg
    with pytest.raises(ValueError, match="num_input_frames must be >= 2"):
        MEGAN(num_input_frames=1)
    with pytest.raises(ValueError, match="divisible by deformable_groups"):
        MEGAN(nf=12, deformable_groups=8)


def test_bad_input_is_one_error_naming_shape_and_dtype():
    model = small()
    want = r"input must be a \(b, 4, 3, H, W\) float32 tensor of RGB frames in \[0, 1\], got "
    for x, got in ((torch.rand(1, 3, 3, 8, 8), r"shape \(1, 3, 3, 8, 8\) float32"),
                   (torch.rand(1, 4, 3, 8, 8, dtype=torch.float64), r"shape \(1, 4, 3, 8, 8\) float64"),
                   (torch.zeros(1, 4, 3, 8, 8, dtype=torch.uint8), r"shape \(1, 4, 3, 8, 8\) uint8 \(8-bit frames"),
                   (np.zeros((1, 4, 3, 8, 8), np.float32), r"a numpy.ndarray")):
        with pytest.raises(ValueError, match=want + got):
            model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: float32 or the autocast dtype
        assert model(torch.rand(1, 4, 3, 8, 8, dtype=torch.bfloat16)).shape == (1, 7, 3, 32, 32)
        with pytest.raises(ValueError, match=r"got shape \(1, 4, 3, 8, 8\) float64"):
            model(torch.rand(1, 4, 3, 8, 8, dtype=torch.float64))


def test_eval_is_deterministic_across_processes(tmp_path):
    import subprocess
    import sys

    model = small()
    perturb_zero_inits(model)
    model.save_pretrained(tmp_path / "m")
    x = torch.rand(1, 4, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import torch\n"
        "torch.set_flush_denormal(True)\n"
        "from megan_fast.models import MEGAN\n"
        f"m = MEGAN.from_pretrained({str(tmp_path / 'm')!r}).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    with torch.no_grad():
        here = model(x)
    there = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(here, there)  # bit for bit, in another process


def test_native_equals_reference_outputs_and_gradients():
    torch.manual_seed(0)
    model = MEGAN(**SMALL).double().train()
    perturb_zero_inits(model)
    x = torch.rand(1, 4, 3, 8, 12, dtype=torch.float64)
    results = {}
    for backend in ("native", "reference"):
        model.zero_grad()
        with use_backend(backend):
            y = model(x, memory_indices=[1, 5])
        y.square().mean().backward()
        results[backend] = (y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    y_n, g_n = results["native"]
    y_r, g_r = results["reference"]
    torch.testing.assert_close(y_n, y_r, atol=1e-9, rtol=1e-9)
    for name in g_r:
        torch.testing.assert_close(g_n[name], g_r[name], atol=1e-8, rtol=1e-7, msg=lambda m: f"{name}: {m}")


def test_every_parameter_gets_a_gradient_in_training():
    model = small().train()
    perturb_zero_inits(model)
    y = model(torch.rand(1, 4, 3, 8, 8))
    y.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_window_starts():
    assert window_starts(4, 4) == [0]
    assert window_starts(7, 4) == [0, 3]
    assert window_starts(8, 4) == [0, 3, 4]
    assert window_starts(10, 4) == [0, 3, 6]
    with pytest.raises(ValueError, match="has 3 frames but the model needs at least 4"):
        window_starts(3, 4)


@pytest.mark.parametrize("t", [4, 5, 8, 10])
def test_long_clip_frame_accounting(t):
    """Every output frame once, in order, each equal to the frame of the earliest window making it."""
    model = small()
    perturb_zero_inits(model)
    frames = torch.rand(t, 3, 8, 8)
    out = upscale_frames(model, frames)
    assert out.shape == (2 * t - 1, 3, 32, 32)
    expected = {}
    with torch.no_grad():
        for s in window_starts(t, 4):
            y = model(frames[s : s + 4].unsqueeze(0))[0]
            for j in range(7):
                expected.setdefault(2 * s + j, y[j])
    assert sorted(expected) == list(range(2 * t - 1))
    for i in range(2 * t - 1):
        torch.testing.assert_close(out[i], expected[i], atol=1e-6, rtol=1e-6)


def test_streaming_holds_at_most_one_window():
    model = small()
    held = []

    def frames():
        for i in range(9):
            held.append(i)
            yield torch.rand(3, 8, 8)

    n = 0
    for i, _ in enumerate(iter_upscale(model, frames())):
        n += 1
        # When output frame i is yielded, at most i//2 + n_in input frames have been read.
        assert len(held) <= i // 2 + 4
    assert n == 17
    with pytest.raises(ValueError, match="the clip has 2 frames; MEGAN takes windows of exactly 4 input frames"):
        list(iter_upscale(model, iter([torch.rand(3, 8, 8)] * 2)))


def test_tile_covering_the_frame_equals_untiled_exactly_and_tiles_are_close():
    model = small()
    perturb_zero_inits(model)
    frames = torch.rand(5, 3, 12, 16)
    full = upscale_frames(model, frames)
    torch.testing.assert_close(upscale_frames(model, frames, tile=16), full, atol=0, rtol=0)
    tiled = upscale_frames(model, frames, tile=8, tile_overlap=4)
    assert tiled.shape == full.shape
    # Tiles see less context, so they differ a little, but blending leaves no seams or holes.
    assert (tiled - full).abs().mean() < 0.05 * full.abs().mean() + 1e-3
    with pytest.raises(ValueError, match="tile_overlap must be in"):
        upscale_frames(model, frames, tile=8, tile_overlap=8)
    with pytest.raises(ValueError, match="window must be 7"):
        upscale_frames(model, frames, window=5)


def test_save_and_load_round_trip(tmp_path):
    model = small(3)
    perturb_zero_inits(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MEGAN.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    x = torch.rand(1, 3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_loading_wrong_shapes_is_a_clear_error_and_load_state_dict_keeps_torchs_contract(tmp_path):
    import json

    small(3).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "nf": 8}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: the weights do not fit this model's config "
                                              r"\(config.json\): \d+ tensor\(s\) of another shape"):
        MEGAN.from_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        MEGAN.from_pretrained(tmp_path / "missing")
    # nn.Module's own method, unchanged: a RuntimeError listing the mismatches, strict=False reporting the rest
    other = MEGAN(num_input_frames=3, **dict(SMALL, nf=8))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(small(3).state_dict())
    state = other.state_dict()
    extra = other.load_state_dict({**state, "extra.weight": torch.zeros(1)}, strict=False)
    assert extra.unexpected_keys == ["extra.weight"] and extra.missing_keys == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        MEGAN.from_pretrained(tmp_path / "empty")


def test_autocast_bfloat16_on_cpu_is_close_to_float32():
    model = small()
    perturb_zero_inits(model)
    x = torch.rand(1, 4, 3, 8, 8)
    with torch.no_grad():
        y32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.shape == (1, 7, 3, 32, 32)
    # bfloat16 keeps 8 bits of mantissa (0.4 %): the network's output stays within 2 % of its range.
    assert (y.float() - y32).abs().max() <= 0.02 * y32.abs().max()


def test_channels_last_input():
    model = small()
    x = torch.rand(2, 4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
