"""megan_fast.images: the one frame listing and image reader (natural order, any bit depth, orientation)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from _media import write_png16
from megan_fast import images, video
from megan_fast.data import datasets
from megan_fast.errors import InputError
from megan_fast.images import list_frames, read_image


def test_one_listing_for_every_reader(tmp_path):
    names = ["frame10.png", "frame2.png", "frame1.png", "Frame3.JPG", ".frame0.png", "notes.txt", "frame4.tiff"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "frame5.png").mkdir()  # a folder with an image name is not a frame
    listed = [os.path.basename(p) for p in list_frames(str(tmp_path))]
    assert listed == ["frame1.png", "frame2.png", "Frame3.JPG", "frame4.tiff", "frame10.png"]
    # The video reader and the datasets list frames with this very function.
    assert video.reading.list_frames is images.list_frames and datasets.list_frames is images.list_frames


def test_sixteen_bit_grey_is_scaled_not_clamped(tmp_path):
    grey = np.array([[0, 257, 32768, 65535]], np.uint16)
    write_png16(str(tmp_path / "g.png"), grey)
    x = read_image(str(tmp_path / "g.png"))
    assert x.shape == (3, 1, 4) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0], torch.tensor(grey[0] / 65535.0, dtype=torch.float32))
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_sixteen_bit_rgb_and_rgba_are_read_at_full_precision(tmp_path):
    a = (np.arange(12, dtype=np.uint16).reshape(1, 12) * 5000 + 77)  # + 77: off the 8-bit grid
    rgb = np.stack([a, 65535 - a, a // 2], -1)
    write_png16(str(tmp_path / "c.png"), rgb)
    write_png16(str(tmp_path / "ca.png"), np.concatenate([rgb, np.full_like(rgb[..., :1], 65535)], -1))
    for name in ("c.png", "ca.png"):
        x = read_image(str(tmp_path / name))
        assert x.shape == (3, 1, 12)
        torch.testing.assert_close(x.permute(1, 2, 0)[0], torch.tensor(rgb[0] / 65535.0, dtype=torch.float32),
                                   atol=1e-7, rtol=0)


def test_sixteen_bit_png_written_and_read_back_exactly(tmp_path):
    from megan_fast.images import save_png16
    from megan_fast.outputs import is_ours

    x = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    save_png16(x, str(tmp_path / "o.png"))
    assert is_ours(str(tmp_path / "o.png"))
    assert torch.equal(read_image(str(tmp_path / "o.png")), x.mul(65535).round().div(65535))


def test_paletted_and_grey_images(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (200, 10, 30)
    rgb[2:] = (5, 250, 100)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    p = Image.open(tmp_path / "p.png")
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    for name in ("p.png", "pt.png"):
        assert torch.equal(read_image(str(tmp_path / name)), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    Image.fromarray(np.full((3, 3), 77, np.uint8)).save(tmp_path / "l.png")
    assert torch.equal(read_image(str(tmp_path / "l.png")), torch.full((3, 3, 3), 77 / 255))


def test_exif_orientation_is_applied(tmp_path):
    pic = np.zeros((4, 6, 3), np.uint8)
    pic[0, 0] = 255
    img = Image.fromarray(pic)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.png", exif=exif)
    x = read_image(str(tmp_path / "o.png"))
    assert x.shape == (3, 6, 4) and images.image_size(str(tmp_path / "o.png")) == (4, 6)
    assert x[0, 0, -1] == 1.0  # the top-left pixel is now at the top right


def test_errors_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="cannot read image .*bad.png"):
        read_image(str(tmp_path / "bad.png"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"))
    with pytest.raises(FileNotFoundError, match="frame folder not found"):
        list_frames(str(tmp_path / "nowhere"))


def test_write_png_marks_and_never_replaces_a_foreign_file(tmp_path):
    from megan_fast.outputs import OutputError, is_ours

    images.write_png(torch.rand(3, 5, 7), str(tmp_path / "a.png"))
    assert is_ours(str(tmp_path / "a.png")) and read_image(str(tmp_path / "a.png")).shape == (3, 5, 7)
    Image.new("RGB", (2, 2)).save(tmp_path / "b.png")
    with pytest.raises(OutputError):
        images.write_png(torch.rand(3, 5, 7), str(tmp_path / "b.png"))
    assert Image.open(tmp_path / "b.png").size == (2, 2)


def test_names_with_other_unicode_digits_sort_without_error(tmp_path):
    for n in ("f10.png", "f2.png", "²0.png", "٣.png"):
        (tmp_path / n).write_bytes(b"")
    assert [os.path.basename(p) for p in list_frames(str(tmp_path))][:2] == ["f2.png", "f10.png"]
