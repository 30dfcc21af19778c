"""imresize against an independent per-pixel evaluation of MATLAB's bicubic definition.

The reference below is written from the documented definition, in MATLAB's
1-based indexing, one output pixel at a time (a 2-D sum over the product of the
two 1-D weight vectors), so it shares no code or structure with the separable
matrix implementation under test.
"""

import math

import numpy as np
import pytest
import torch

from megan_fast.data.imresize import bicubic_downscale_x4, cubic_kernel, imresize, resize_matrix


def _cubic(x: float) -> float:
    ax = abs(x)
    if ax <= 1:
        return 1.5 * ax**3 - 2.5 * ax**2 + 1
    if ax <= 2:
        return -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2
    return 0.0


def _taps_1based(in_len: int, scale: float, i: int, antialias: bool = True):
    """Weights and 1-based (mirrored) input indices of 1-based output sample i."""
    width = 4.0
    aa = antialias and scale < 1
    if aa:
        width = 4.0 / scale
    u = i / scale + 0.5 * (1 - 1 / scale)
    left = math.floor(u - width / 2)
    p = math.ceil(width) + 2
    idx = [left + k for k in range(p)]
    if aa:
        w = [scale * _cubic(scale * (u - j)) for j in idx]
    else:
        w = [_cubic(u - j) for j in idx]
    s = sum(w)
    w = [v / s for v in w]
    aux = list(range(1, in_len + 1)) + list(range(in_len, 0, -1))
    idx = [aux[(j - 1) % (2 * in_len)] for j in idx]
    return w, idx


def reference_imresize(img: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """(h, w) float64 -> (ceil(h*scale), ceil(w*scale)), one output pixel at a time."""
    h, w = img.shape
    oh, ow = math.ceil(h * scale), math.ceil(w * scale)
    out = np.zeros((oh, ow))
    for r in range(1, oh + 1):
        wy, iy = _taps_1based(h, scale, r, antialias)
        for c in range(1, ow + 1):
            wx, ix = _taps_1based(w, scale, c, antialias)
            acc = 0.0
            for a, yy in zip(wy, iy):
                for b, xx in zip(wx, ix):
                    acc += a * b * img[yy - 1, xx - 1]
            out[r - 1, c - 1] = acc
    return out


@pytest.mark.parametrize(
    "shape,scale",
    [((16, 16), 0.25), ((13, 10), 0.25), ((9, 11), 0.5), ((7, 6), 1 / 3), ((5, 7), 2.0), ((4, 6), 4.0), ((6, 5), 1.5)],
)
def test_matches_reference_float64(shape, scale):
    rng = np.random.default_rng(0)
    img = rng.random(shape)
    ref = reference_imresize(img, scale)
    out = imresize(torch.from_numpy(img), scale=scale).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_matches_reference_without_antialiasing():
    img = np.random.default_rng(1).random((12, 9))
    ref = reference_imresize(img, 0.5, antialias=False)
    out = imresize(torch.from_numpy(img), scale=0.5, antialiasing=False).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_real_photo_batched_float32():
    from skimage import data

    photo = data.astronaut()[200:248, 180:236].astype(np.float64) / 255  # (48, 56, 3) real texture
    chw = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    batch = torch.stack([chw, chw.flip(-1)], 0)  # (2, 3, 48, 56)
    out64 = imresize(batch, scale=0.25)
    out32 = imresize(batch.float(), scale=0.25)
    assert out64.shape == (2, 3, 12, 14) and out32.dtype == torch.float32
    for ch in range(3):
        ref = reference_imresize(photo[..., ch], 0.25)
        np.testing.assert_allclose(out64[0, ch].numpy(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=2e-6)
    # Mirror symmetry of the definition: flipping commutes with resizing (n divisible by 1/scale).
    torch.testing.assert_close(out64[1], out64[0].flip(-1), rtol=0, atol=1e-12)


def test_constant_stays_constant():
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        x = torch.full((2, 3, 17, 23), 0.7, dtype=dtype)
        for kw in ({"scale": 0.25}, {"scale": 3.0}, {"scale": (0.5, 1.7)}, {"size": (5, 40)}):
            y = imresize(x, **kw)
            assert (y - 0.7).abs().max().item() < tol, kw


def test_output_sizes():
    x = torch.rand(1, 3, 7, 9)
    assert imresize(x, scale=0.25).shape == (1, 3, 2, 3)  # ceil(7/4), ceil(9/4)
    assert imresize(x, scale=0.5).shape == (1, 3, 4, 5)
    assert imresize(x, scale=2).shape == (1, 3, 14, 18)
    assert imresize(x, size=(3, 20)).shape == (1, 3, 3, 20)
    assert imresize(torch.rand(30, 30), scale=0.1).shape == (3, 3)  # 0.1 * 30 is not ceil'ed to 4
    assert bicubic_downscale_x4(torch.rand(5, 3, 64, 112)).shape == (5, 3, 16, 28)


def test_x4_ramp_16x16():
    ramp = torch.arange(16, dtype=torch.float64).repeat(16, 1)  # value = column index
    out = imresize(ramp, scale=0.25)
    assert out.shape == (4, 4)
    # Rows stay identical (constant along y); the kernel and the mirror are symmetric,
    # so the reversed ramp 15 - x gives the reversed output: out_j + out_{3-j} = 15.
    torch.testing.assert_close(out, out[:1].expand(4, 4), rtol=0, atol=1e-13)
    torch.testing.assert_close(out[0] + out[0].flip(0), torch.full((4,), 15.0, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((out[0].diff() > 0).all())
    ref = reference_imresize(ramp.numpy(), 0.25)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    # Near the borders the mirrored ramp pulls the values inwards; away from them a
    # symmetric kernel around the centre 4j + 1.5 returns the ramp's value there.
    assert 1.3 < out[0, 0].item() < 1.5 and 13.5 < out[0, 3].item() < 13.7
    wide = imresize(torch.arange(64, dtype=torch.float64)[None], scale=0.25)[0]
    interior = torch.arange(2, 14, dtype=torch.float64)
    torch.testing.assert_close(wide[2:14], 4.0 * interior + 1.5, rtol=0, atol=1e-12)


def test_upscaling_reproduces_quadratics():
    # Keys' cubic with a = -0.5 reproduces polynomials up to degree 2 exactly
    # (the weights sum to 1 without normalisation when upscaling).
    x = torch.arange(20, dtype=torch.float64)
    f = 0.3 * x**2 - 2 * x + 1
    out = imresize(f[None], scale=(1.0, 2.0))[0]
    u = (torch.arange(40, dtype=torch.float64) + 0.5) / 2 - 0.5  # input coordinates of the outputs
    interior = slice(4, 36)  # taps stay inside the image
    torch.testing.assert_close(out[interior], (0.3 * u**2 - 2 * u + 1)[interior], rtol=0, atol=1e-11)


def test_identity_scale_one():
    x = torch.rand(2, 3, 8, 5, dtype=torch.float64)
    torch.testing.assert_close(imresize(x, scale=1.0), x, rtol=0, atol=1e-15)


def test_kernel_and_matrix():
    t = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.5], dtype=torch.float64)
    ref = torch.tensor([_cubic(v) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(cubic_kernel(t), ref)
    m = resize_matrix(13, 4, 0.25)
    assert m.shape == (4, 13)
    torch.testing.assert_close(m.sum(1), torch.ones(4, dtype=torch.float64))


def test_float16_bfloat16_and_empty_batch():
    x = torch.rand(2, 3, 16, 16)
    for dt in (torch.float16, torch.bfloat16):
        y = imresize(x.to(dt), scale=0.25)
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), imresize(x, scale=0.25), rtol=0, atol=2e-2)
    assert imresize(torch.rand(0, 3, 16, 16), scale=0.25).shape == (0, 3, 4, 4)


def test_errors():
    x = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(x)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(x, scale=0.5, size=(4, 4))
    with pytest.raises(ValueError, match="scale"):
        imresize(x, scale=-1)
    with pytest.raises(ValueError, match="size"):
        imresize(x, size=(0, 4))
    with pytest.raises(TypeError, match="floating"):
        imresize(torch.zeros(3, 8, 8, dtype=torch.uint8), scale=0.5)
    with pytest.raises(ValueError, match=r"\(\.\.\., h, w\)"):
        imresize(torch.rand(8), scale=0.5)
