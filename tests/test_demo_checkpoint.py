"""The photo-clip training data, the global skip connection, the demo recipe and the shipped checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("skimage", reason="the photo clips are rendered from scikit-image's bundled photos")

from megan_fast.data.imresize import imresize  # noqa: E402
from megan_fast.data.synthetic import PhotoClips, available_photos, main as synthetic_main  # noqa: E402
from megan_fast.evaluation import bicubic_blend  # noqa: E402
from megan_fast.models import MEGAN  # noqa: E402
from megan_fast.errors import ConfigError  # noqa: E402
from megan_fast.training import build_dataset, load_config, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "megan_demo.yaml")
DEMO_CHECKPOINT = os.path.join(ROOT, "megan_fast", "checkpoints", "demo")
from _models import TINY_MEGAN as TINY  # noqa: E402


# --------------------------------------------------------------------------- PhotoClips


def test_photo_clips_items():
    ds = PhotoClips(["astronaut", "rocket"], length=5, crop=8, seed=3)
    item = ds[2]
    assert item["lq"].shape == (4, 3, 8, 8) and item["gt"].shape == (7, 3, 32, 32)
    assert item["key"].split("/")[0] in ("astronaut", "rocket")
    gt = item["gt"]
    # GT on 8-bit levels; LR = MATLAB bicubic of GT frames 0, 2, 4, 6 on 8-bit levels
    # (augmentation flips / transposes / reverses both alike, which commutes with imresize).
    assert torch.equal(gt, gt.mul(255).round().div(255))
    lq = imresize(gt[0::2], scale=0.25).clamp(0, 1).mul(255).round().div(255)
    torch.testing.assert_close(item["lq"], lq, atol=1e-6, rtol=0)
    assert float(gt.std()) > 0.01  # real texture, not a flat frame


def test_photo_clips_reproducible_and_epoch_dependent():
    a = PhotoClips(["astronaut", "rocket"], length=4, crop=8, seed=1)
    b = PhotoClips(["astronaut", "rocket"], length=4, crop=8, seed=1)
    assert torch.equal(a[3]["gt"], b[3]["gt"])
    b.set_epoch(1)
    assert not torch.equal(a[3]["gt"], b[3]["gt"])
    assert not torch.equal(a[0]["gt"], a[1]["gt"])


def test_photo_clips_errors():
    with pytest.raises(ValueError, match="photos"):
        PhotoClips("astronaut")
    with pytest.raises(ValueError, match="not bundled|unknown"):
        PhotoClips(["no_such_photo"])
    with pytest.raises(ValueError, match="length"):
        PhotoClips(["astronaut"], length=0)
    with pytest.raises(ValueError, match="pan_speed"):
        PhotoClips(["astronaut"], pan_speed=(2.0, 1.0))
    with pytest.raises(IndexError):
        PhotoClips(["astronaut"], length=2, crop=8)[2]


def test_write_photo_clips_cli(tmp_path, capsys):
    out = tmp_path / "heldout"
    assert synthetic_main([str(out), "--photos", "chelsea", "--clips-per-photo", "2", "--frames", "3",
                           "--size", "16x20"]) == 0
    assert sorted(os.listdir(out)) == ["chelsea_0", "chelsea_1"]
    assert sorted(os.listdir(out / "chelsea_1")) == ["00000.png", "00001.png", "00002.png"]
    with pytest.raises(SystemExit):
        synthetic_main([str(out), "--photos", "chelsea", "--size", "15x20"])


# --------------------------------------------------------------------------- global skip


def test_global_skip_starts_at_the_baseline_and_learns_a_residual():
    torch.manual_seed(0)
    model = MEGAN(**TINY, global_skip=True)
    x = torch.rand(2, 4, 3, 9, 13)
    with torch.no_grad():
        y = model(x)
    for i in range(2):
        torch.testing.assert_close(y[i], bicubic_blend(x[i]), atol=1e-6, rtol=0)
    y = model(x)
    y.square().mean().backward()
    assert model.reconstruction.conv_last.weight.grad.abs().sum() > 0
    # Without the skip, the paper's model: no baseline in the output.
    plain = MEGAN(**TINY)
    with torch.no_grad():
        assert not torch.allclose(plain(x)[0], bicubic_blend(x[0]), atol=1e-3)


def test_global_skip_does_not_change_the_parameters():
    assert sum(p.numel() for p in MEGAN(global_skip=True).parameters()) == 10_657_651


# --------------------------------------------------------------------------- the recipe


def test_demo_config_loads_and_builds_its_dataset():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.model == {"global_skip": True}
    ds = build_dataset(cfg.data.train, cfg.seed, train=True)
    assert isinstance(ds, PhotoClips) and len(ds) == 100000
    held_out = {"chelsea", "coffee"}
    assert held_out.isdisjoint(ds.photos) and set(ds.photos) <= set(available_photos())
    item = ds[0]
    assert item["gt"].shape == (7, 3, 128, 128)


def test_photos_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: {type: photos, photos: [astronaut], colour: red}}\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config(str(path))
    path.write_text("data: {train: {type: pictures}}\n")
    with pytest.raises(ConfigError, match="pictures"):
        load_config(str(path))
    path.write_text("data: {train: {type: folder, crop: 8}}\n")
    with pytest.raises(ConfigError, match="root"):
        load_config(str(path))


def test_training_on_photo_clips_runs(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    cfg.model = dict(TINY, global_skip=True)
    cfg.output_dir = str(tmp_path / "run")
    cfg.data.train.update(length=8, crop=8)
    cfg.data.batch_size, cfg.data.num_workers = 2, 0
    cfg.optim.iterations, cfg.optim.warmup_iterations = 2, 1
    cfg.logging.save_every = 2
    summary = train(cfg, device="cpu", progress=False)
    assert summary.iteration == 2 and summary.last_loss == summary.last_loss  # finite, not NaN
    assert os.path.isfile(tmp_path / "run" / "model" / "model.safetensors")


# --------------------------------------------------------------------------- the shipped checkpoint


def test_shipped_checkpoint_is_the_recipes_model():
    with open(os.path.join(DEMO_CHECKPOINT, "config.json")) as f:
        config = json.load(f)
    assert config["global_skip"] is True and config["nf"] == 64 and config["back_blocks"] == 20
    model = MEGAN.from_pretrained(DEMO_CHECKPOINT)
    assert sum(p.numel() for p in model.parameters()) == 10_657_651
    # Trained: the last convolution is no longer the zero it starts from.
    assert model.reconstruction.conv_last.weight.abs().max() > 0


def test_shipped_checkpoint_beats_the_baseline_on_a_held_out_clip():
    # A small held-out clip (chelsea is not in the training photos): Y-PSNR of MEGAN vs bicubic + blending.
    from megan_fast.data.synthetic import make_clip
    from megan_fast.metrics import psnr_y

    torch.set_flush_denormal(True)
    gt = make_clip("chelsea", 7, (32, 48), "pan", 1.0, seed=5, view_scale=1.5).mul(255).round().div(255)
    lq = imresize(gt[0::2], scale=0.25).clamp(0, 1).mul(255).round().div(255)
    model = MEGAN.from_pretrained(DEMO_CHECKPOINT).eval()
    with torch.no_grad():
        out = model(lq[None])[0].clamp(0, 1)
    base = bicubic_blend(lq).clamp(0, 1)

    def score(pred):
        return sum(float(psnr_y(pred[i], gt[i])) for i in range(7)) / 7

    assert score(out) > score(base)
