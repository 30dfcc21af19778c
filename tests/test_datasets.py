"""Datasets on small real-texture clips made from scikit-image's photos (Vimeo layout and folder layout)."""

import itertools
import os
import shutil

import pytest
import torch

from megan_fast.data import VideoFolderClips, Vimeo90KSeptuplet, bicubic_downscale_x4, imresize, list_frames, read_image
from megan_fast.data.synthetic import available_photos, load_photo, make_clip, write_clip_folder, write_vimeo_layout

GT_SIZE = (48, 64)  # LR 12 x 16


def _quantize(x):
    return x.clamp(0, 1).mul(255).round().div(255)


@pytest.fixture(scope="module")
def vimeo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vimeo")
    clips = {
        "00001/0001": make_clip("astronaut", 7, GT_SIZE, motion="pan", seed=1),
        "00001/0002": make_clip("coffee", 7, GT_SIZE, motion="zoom", seed=2),
        "00002/0001": make_clip("chelsea", 7, GT_SIZE, motion="pan", speed=0.7, seed=3),
    }
    keys = list(clips)
    lists = {"sep_trainlist.txt": keys, "sep_testlist.txt": keys[1:], "sep_fast_testset.txt": keys[:1]}
    write_vimeo_layout(str(root / "gt"), clips, lists=lists, lq_root=str(root / "lq"))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    lengths = {"clip_a": 9, "clip_b": 13}
    for (name, t), photo in zip(lengths.items(), ("rocket", "chelsea")):
        gt = make_clip(photo, t, GT_SIZE, seed=len(name) + t)
        write_clip_folder(gt, str(root / "gt" / name))
        write_clip_folder(_quantize(bicubic_downscale_x4(_quantize(gt))), str(root / "lq" / name))
    return root


def _frames_equal(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def _transforms():
    """All 16 combinations of (hflip, vflip, transpose, reverse) as functions on (t, c, h, w)."""
    for flags in itertools.product((False, True), repeat=4):
        def f(x, flags=flags):
            if flags[0]:
                x = x.flip(-1)
            if flags[1]:
                x = x.flip(-2)
            if flags[2]:
                x = x.transpose(-2, -1)
            if flags[3]:
                x = x.flip(0)
            return x
        yield flags, f


# --------------------------------------------------------------------------- Vimeo-90K


def test_vimeo_train_item_shapes(vimeo):
    ds = Vimeo90KSeptuplet(str(vimeo / "gt"), crop=8, lq_root=str(vimeo / "lq"))
    assert len(ds) == 3
    item = ds[1]
    assert item["lq"].shape == (4, 3, 8, 8) and item["gt"].shape == (7, 3, 32, 32)
    assert item["lq"].dtype == torch.float32 and item["gt"].dtype == torch.float32
    assert 0 <= item["lq"].min() and item["gt"].max() <= 1
    assert item["key"] == "00001/0002"
    assert item["lq"].is_contiguous() and item["gt"].is_contiguous()


def test_vimeo_test_split_whole_frames(vimeo):
    ds = Vimeo90KSeptuplet(str(vimeo / "gt"), split="test", lq_root=str(vimeo / "lq"))
    assert ds.keys == ["00001/0002", "00002/0001"]
    item = ds[0]
    assert item["lq"].shape == (4, 3, 12, 16) and item["gt"].shape == (7, 3, 48, 64)
    seq = vimeo / "gt" / "sequences" / "00001" / "0002"
    lq_seq = vimeo / "lq" / "sequences" / "00001" / "0002"
    for j in range(7):
        assert torch.equal(item["gt"][j], read_image(str(seq / f"im{j + 1}.png")))
    for j, n in enumerate((1, 3, 5, 7)):  # inputs are frames 1, 3, 5, 7
        assert torch.equal(item["lq"][j], read_image(str(lq_seq / f"im{n}.png")))
    again = Vimeo90KSeptuplet(str(vimeo / "gt"), split="test", lq_root=str(vimeo / "lq"), seed=5)
    again.set_epoch(3)
    assert torch.equal(again[0]["gt"], item["gt"])  # no randomness on test splits


def test_vimeo_fast_medium_slow_lists(vimeo, tmp_path):
    root = str(vimeo / "gt")
    fast = Vimeo90KSeptuplet(root, split="fast")
    assert fast.keys == ["00001/0001"] and fast[0]["gt"].shape == (7, 3, 48, 64)
    with pytest.raises(FileNotFoundError, match="sep_medium_testset.txt"):
        Vimeo90KSeptuplet(root, split="medium")
    lst = tmp_path / "slow.txt"
    lst.write_text("00002/0001\n\n")
    assert Vimeo90KSeptuplet(root, split="slow", list_file=str(lst)).keys == ["00002/0001"]


def test_vimeo_on_the_fly_lr_matches_imresize_of_gt_crop(vimeo):
    """LR made on the fly = MATLAB bicubic x4 of the (augmented) GT crop."""
    root = str(vimeo / "gt")
    exact = Vimeo90KSeptuplet(root, crop=8, augment=True, quantize_lq=False)
    quant = Vimeo90KSeptuplet(root, crop=8, augment=True)
    for epoch in range(2):
        exact.set_epoch(epoch)
        quant.set_epoch(epoch)
        for i in range(len(exact)):
            item = exact[i]
            expect = imresize(item["gt"][0::2].double(), scale=0.25).clamp(0, 1)
            torch.testing.assert_close(item["lq"].double(), expect, rtol=0, atol=1e-5)
            q = quant[i]
            assert torch.equal(q["gt"], item["gt"])
            assert (q["lq"].double() - expect).abs().max() <= 0.5 / 255 + 1e-5
            assert torch.equal(q["lq"], _quantize(q["lq"]))  # 8-bit levels


def test_vimeo_premade_lr_crop_aligned_with_gt(vimeo):
    ds = Vimeo90KSeptuplet(str(vimeo / "gt"), crop=6, augment=False, lq_root=str(vimeo / "lq"))
    item = ds[2]
    gt_full = read_image(str(vimeo / "gt" / "sequences" / "00002" / "0001" / "im1.png"))
    lq_full = read_image(str(vimeo / "lq" / "sequences" / "00002" / "0001" / "im1.png"))
    found = [(y, x) for y in range(12 - 6 + 1) for x in range(16 - 6 + 1)
             if torch.equal(gt_full[:, 4 * y : 4 * y + 24, 4 * x : 4 * x + 24], item["gt"][0])]
    assert len(found) == 1
    y, x = found[0]
    assert torch.equal(item["lq"][0], lq_full[:, y : y + 6, x : x + 6])


def test_vimeo_augmentation_consistent_between_lr_and_gt(vimeo):
    """With pre-made LR, the augmented item is one transform of the plain item, the same for LR and GT."""
    kw = dict(crop=8, lq_root=str(vimeo / "lq"), seed=7)
    aug = Vimeo90KSeptuplet(str(vimeo / "gt"), augment=True, **kw)
    plain = Vimeo90KSeptuplet(str(vimeo / "gt"), augment=False, **kw)
    seen = set()
    for epoch in range(4):
        aug.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(aug)):
            a, p = aug[i], plain[i]
            matches = [flags for flags, f in _transforms()
                       if _frames_equal(f(p["lq"]), a["lq"]) and _frames_equal(f(p["gt"]), a["gt"])]
            assert matches, f"epoch {epoch} item {i}: no single transform maps the plain item to the augmented one"
            seen.update(matches)
    assert len(seen) > 3  # the augmentations really vary


def test_vimeo_reproducible(vimeo):
    root = str(vimeo / "gt")
    a = Vimeo90KSeptuplet(root, crop=8, seed=3)
    b = Vimeo90KSeptuplet(root, crop=8, seed=3)
    assert all(torch.equal(a[i]["gt"], b[i]["gt"]) for i in range(3))
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["gt"], b[i]["gt"]) for i in range(3))
    c = Vimeo90KSeptuplet(root, crop=8, seed=4)
    assert any(not torch.equal(a[i]["gt"], c[i]["gt"]) for i in range(3))


def test_vimeo_dataloader_reproducible_across_workers(vimeo):
    ds = Vimeo90KSeptuplet(str(vimeo / "gt"), crop=8, seed=11, lq_root=str(vimeo / "lq"))
    ds.set_epoch(2)

    def run(workers):
        g = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, generator=g, num_workers=workers)
        return [(b["key"], b["lq"], b["gt"]) for b in loader]

    one, two = run(0), run(2)
    assert len(one) == 2
    for (k1, l1, g1), (k2, l2, g2) in zip(one, two):
        assert k1 == k2 and torch.equal(l1, l2) and torch.equal(g1, g2)


def test_vimeo_errors(vimeo, tmp_path):
    root = str(vimeo / "gt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Vimeo90KSeptuplet(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="sequences"):
        Vimeo90KSeptuplet(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="LR folder"):
        Vimeo90KSeptuplet(root, lq_root=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="split"):
        Vimeo90KSeptuplet(root, split="val")
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("\n")
    with pytest.raises(ValueError, match="no entries"):
        Vimeo90KSeptuplet(root, list_file=str(empty_list))
    with pytest.raises(FileNotFoundError, match="sep_trainlist.txt"):
        (tmp_path / "empty" / "sequences").mkdir()
        Vimeo90KSeptuplet(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="crop=20 is larger than the LR frame 16x12"):
        Vimeo90KSeptuplet(root, crop=20)[0]
    with pytest.raises(ValueError, match="crop"):
        Vimeo90KSeptuplet(root, crop=0)


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_vimeo_bad_files(vimeo, tmp_path):
    gt = _copy_tree(vimeo / "gt", tmp_path / "gt")
    lq = _copy_tree(vimeo / "lq", tmp_path / "lq")
    # Missing frame.
    missing = gt / "sequences" / "00001" / "0001" / "im4.png"
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match="im4.png"):
        Vimeo90KSeptuplet(str(gt), split="test", list_file=str(gt / "sep_fast_testset.txt"))[0]
    # Corrupt frame: a truncated PNG and a text file.
    bad = gt / "sequences" / "00001" / "0002" / "im2.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot read image .*0002.im2\.png"):
        Vimeo90KSeptuplet(str(gt), split="test")[0]
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*im2\.png"):
        Vimeo90KSeptuplet(str(gt), split="test")[0]
    # LR of the wrong size.
    lq_frame = lq / "sequences" / "00002" / "0001" / "im1.png"
    write_clip_folder(torch.rand(7, 3, 13, 16), str(lq_frame.parent), pattern="im{}.png", start=1)
    with pytest.raises(ValueError, match=r"16x13 \(w x h\) but GT frame .* is 64x48.*GT/4"):
        Vimeo90KSeptuplet(str(gt), split="test", lq_root=str(lq))[1]
    # GT frames of different sizes within a clip.
    write_clip_folder(torch.rand(1, 3, 44, 64), str(gt / "sequences" / "00002" / "0001"), pattern="im{}.png", start=5)
    with pytest.raises(ValueError, match="one size"):
        Vimeo90KSeptuplet(str(gt), split="test")[1]


def test_on_the_fly_needs_multiple_of_scale(tmp_path):
    write_vimeo_layout(str(tmp_path / "v"), [make_clip("rocket", 7, (30, 40), seed=0)])
    with pytest.raises(ValueError, match="not a multiple of scale=4"):
        Vimeo90KSeptuplet(str(tmp_path / "v"), split="test")[0]
    item = Vimeo90KSeptuplet(str(tmp_path / "v"), crop=7)[0]  # crops are fine
    assert item["lq"].shape == (4, 3, 7, 7)


# --------------------------------------------------------------------------- folders of clips


def test_folder_train_windows_and_items(folders):
    ds = VideoFolderClips(str(folders / "gt"), str(folders / "lq"), crop=8)
    assert ds.clip_names == ["clip_a", "clip_b"]
    assert len(ds) == (9 - 6) + (13 - 6)
    item = ds[4]
    assert item["key"] == "clip_b/00001"
    assert item["lq"].shape == (4, 3, 8, 8) and item["gt"].shape == (7, 3, 32, 32)
    assert len(VideoFolderClips(str(folders / "gt"), window_stride=3, crop=8)) == 1 + 3


def test_folder_items_are_windows_of_the_clip(folders):
    ds = VideoFolderClips(str(folders / "gt"), str(folders / "lq"), crop=None, augment=False)
    gt, lq = ds.clip_frames("clip_b")
    item = ds[3 + 2]  # clip_b, start 2
    assert torch.equal(item["gt"], gt[2:9]) and torch.equal(item["lq"], lq[2:9:2])


def test_folder_augmentation_consistent(folders):
    kw = dict(lq_root=str(folders / "lq"), crop=6, seed=1)
    aug = VideoFolderClips(str(folders / "gt"), augment=True, **kw)
    plain = VideoFolderClips(str(folders / "gt"), augment=False, **kw)
    for i in range(0, len(aug), 2):
        a, p = aug[i], plain[i]
        assert any(_frames_equal(f(p["lq"]), a["lq"]) and _frames_equal(f(p["gt"]), a["gt"]) for _, f in _transforms())


def test_folder_on_the_fly_lr(folders):
    ds = VideoFolderClips(str(folders / "gt"), crop=8, quantize_lq=False, seed=2)
    for i in (0, 7):
        item = ds[i]
        expect = imresize(item["gt"][0::2].double(), scale=0.25).clamp(0, 1)
        torch.testing.assert_close(item["lq"].double(), expect, rtol=0, atol=1e-5)


def test_folder_eval_mode(folders):
    ds = VideoFolderClips(str(folders / "gt"), str(folders / "lq"), mode="eval", crop=8, augment=True)
    # Protocol windows: stride 6, last aligned to the end: 9 frames -> 0, 2; 13 -> 0, 6.
    assert ds.windows == [("clip_a", 0), ("clip_a", 2), ("clip_b", 0), ("clip_b", 6)]
    item = ds[1]
    assert item["gt"].shape == (7, 3, 48, 64) and item["lq"].shape == (4, 3, 12, 16)
    gt, lq = ds.clip_frames("clip_a")
    assert gt.shape == (9, 3, 48, 64) and lq.shape == (9, 3, 12, 16)
    assert torch.equal(item["gt"], gt[2:9])
    names = [name for name, g, l in ds.iter_clips()]
    assert names == ["clip_a", "clip_b"]
    no_lr = VideoFolderClips(str(folders / "gt"), mode="eval")
    assert no_lr.clip_frames("clip_b")[1] is None
    with pytest.raises(KeyError, match="clip_c"):
        ds.clip_frames("clip_c")


def test_folder_natural_order_and_extensions(tmp_path):
    clip = make_clip("hubble_deep_field", 8, (16, 16), seed=0)
    folder = tmp_path / "gt" / "c"
    names = ["f2.png", "f10.png", "f1.jpg", "f3.bmp", "f4.PNG", "f5.png", "f6.png", "f7.png"]
    paths = write_clip_folder(clip, str(folder))
    for p, n in zip(paths, names):
        os.replace(p, folder / n)
    (folder / "notes.txt").write_text("ignored")
    order = [os.path.basename(p) for p in list_frames(str(folder))]
    assert order == ["f1.jpg", "f2.png", "f3.bmp", "f4.PNG", "f5.png", "f6.png", "f7.png", "f10.png"]
    assert len(VideoFolderClips(str(tmp_path / "gt"), crop=4)) == 2


def test_folder_errors(folders, tmp_path):
    gt, lq = folders / "gt", folders / "lq"
    with pytest.raises(FileNotFoundError, match="GT folder not found"):
        VideoFolderClips(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="LR folder not found"):
        VideoFolderClips(str(gt), str(tmp_path / "missing"))
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no clip folders"):
        VideoFolderClips(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="mode"):
        VideoFolderClips(str(gt), mode="test")
    # Short clips: 5 frames are enough for eval (>= 2: evaluation says what the model needs), not for training
    # (>= 7); 1 for neither.
    short = tmp_path / "short"
    write_clip_folder(make_clip("retina", 5, (16, 16), seed=0), str(short / "s"))
    with pytest.raises(ValueError, match=r"has 5 frames; mode 'train' needs at least 7"):
        VideoFolderClips(str(short))
    ev = VideoFolderClips(str(short), mode="eval")
    assert len(ev) == 0 and ev.clip_frames("s")[0].shape == (5, 3, 16, 16)
    for p in list_frames(str(short / "s"))[1:]:
        os.remove(p)
    with pytest.raises(ValueError, match=r"has 1 frames; mode 'eval' needs at least 2"):
        VideoFolderClips(str(short), mode="eval")
    # LR folders: missing clip, wrong count, wrong size.
    lq2 = _copy_tree(lq, tmp_path / "lq2")
    shutil.rmtree(lq2 / "clip_b")
    with pytest.raises(FileNotFoundError, match="LR clip folder not found: .*clip_b"):
        VideoFolderClips(str(gt), str(lq2))
    write_clip_folder(torch.rand(3, 3, 12, 16), str(lq2 / "clip_b"))
    with pytest.raises(ValueError, match="has 3 frames but GT clip"):
        VideoFolderClips(str(gt), str(lq2))
    write_clip_folder(torch.rand(13, 3, 11, 16), str(lq2 / "clip_b"))
    ds = VideoFolderClips(str(gt), str(lq2), mode="eval")
    with pytest.raises(ValueError, match=r"16x11 \(w x h\) but GT frame .* is 64x48"):
        ds.clip_frames("clip_b")
    with pytest.raises(ValueError, match="LR must be GT/4"):
        ds[2]
    with pytest.raises(ValueError, match="crop=13 is larger than the LR frame 16x12"):
        VideoFolderClips(str(gt), crop=13)[0]


# --------------------------------------------------------------------------- synthetic clips


def test_make_clip(tmp_path):
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= set(available_photos())
    clip = make_clip("astronaut", 5, (24, 40), motion="pan", speed=2.0, seed=4)
    assert clip.shape == (5, 3, 24, 40) and clip.dtype == torch.float32
    assert 0 <= clip.min() and clip.max() <= 1 and clip.std() > 0.02  # real texture, not flat
    assert torch.equal(clip, make_clip("astronaut", 5, (24, 40), motion="pan", speed=2.0, seed=4))
    assert not torch.equal(clip, make_clip("astronaut", 5, (24, 40), motion="pan", speed=2.0, seed=5))
    # The camera moves: frame 1 is frame 0 moved by ~2 pixels, so some shift of at most 2 pixels
    # in each direction explains frame 1 far better than no shift.
    f0, f1 = clip[0], clip[1]

    def err(dy, dx):
        a = f0[:, 3 + dy : 21 + dy, 3 + dx : 37 + dx]
        return (a - f1[:, 3:21, 3:37]).abs().mean().item()

    best = min(err(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3))
    assert best < 0.6 * err(0, 0)
    zoom = make_clip("coffee", 4, (20, 20), motion="zoom", speed=0.05, seed=0, view_scale=3.0)
    assert zoom.shape == (4, 3, 20, 20) and (zoom[3] - zoom[0]).abs().mean() > 0.005
    paths = write_clip_folder(clip, str(tmp_path / "c"))
    assert [os.path.basename(p) for p in paths] == [f"{i:05d}.png" for i in range(5)]
    assert sorted(os.listdir(tmp_path / "c")) == [f"{i:05d}.png" for i in range(5)]  # no temp files left
    back = torch.stack([read_image(p) for p in paths])
    assert (back - clip).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="unknown photo"):
        make_clip("camera_man", 3)
    with pytest.raises(ValueError, match="motion"):
        make_clip("astronaut", 3, motion="spin")
    with pytest.raises(ValueError, match=r"\(t, 3, h, w\)"):
        write_clip_folder(torch.rand(3, 16, 16), str(tmp_path / "d"))
    assert load_photo("chelsea").shape == (3, 300, 451)
