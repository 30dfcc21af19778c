"""PSNR / SSIM against scikit-image's independent implementations, on real photos.

Image pairs are real textures from scikit-image's bundled photos: a crop and
its x4 bicubic down-and-up version (the error a super-resolution method makes),
and the crop with noise.

Tolerances:
- PSNR: skimage.metrics.peak_signal_noise_ratio(data_range=255) on a Y channel
  computed here from the BT.601 formula: both are float64 means of the same
  squared differences, so they agree to 1e-10 dB.
- SSIM: skimage.metrics.structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255) uses the same
  window (scipy's Gaussian truncated at 3.5 sigma: radius int(3.5*1.5+0.5) = 5,
  11 taps, normalised), the same constants and population variances.  It
  filters the whole image with reflect padding, but averages the SSIM map only
  after cropping (win_size - 1) // 2 = 5 pixels from every side: exactly the
  pixels whose window lies inside the image, i.e. our 'valid' map.  The two
  means are then equal up to summation order, so we require 1e-9 (observed
  ~1e-15).  The full maps (skimage's ``full=True``) differ only in the
  5-pixel border, which we also check.
"""

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from megan_fast.data.imresize import imresize
from megan_fast.metrics import calculate_psnr, calculate_ssim, gaussian_window, psnr_y, rgb_to_y, ssim_y

SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)


def _y_independent(rgb_uint8: np.ndarray) -> np.ndarray:
    """BT.601 Y (MATLAB rgb2ycbcr) written from the definition: [0, 255] scale."""
    x = rgb_uint8.astype(np.float64) / 255.0
    return 16.0 + x @ np.array([65.481, 128.553, 24.966])


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def pairs():
    """(reference, distorted) uint8 RGB pairs of real photo crops."""
    astro = data.astronaut()[96:192, 160:280]  # (96, 120, 3)
    coffee = data.coffee()[150:214, 300:380]  # (64, 80, 3)
    out = []
    for img in (astro, coffee):
        t = torch.from_numpy(img).permute(2, 0, 1).double() / 255
        blurred = imresize(imresize(t, scale=0.25), scale=4.0)  # SR-like error
        out.append((img, _to_uint8(blurred)))
    noise = np.random.default_rng(0).integers(-12, 13, astro.shape)
    noisy = np.clip(astro.astype(int) + noise, 0, 255).astype(np.uint8)
    out.append((astro, noisy))
    return out


def test_rgb_to_y_known_values():
    rgb = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    np.testing.assert_allclose(rgb_to_y(rgb), [16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966], rtol=0, atol=1e-12)
    t = torch.from_numpy(rgb.T.copy()).reshape(3, 5, 1)  # (3, h, w) channels first
    np.testing.assert_allclose(rgb_to_y(t)[:, 0].numpy(), rgb_to_y(rgb), rtol=0, atol=1e-12)


def test_psnr_vs_skimage(pairs):
    for ref, dist in pairs:
        expect = peak_signal_noise_ratio(_y_independent(ref), _y_independent(dist), data_range=255)
        assert calculate_psnr(dist, ref) == pytest.approx(expect, abs=1e-10)
        # All channels together (test_y_channel=False) is plain PSNR of the uint8 arrays.
        expect_rgb = peak_signal_noise_ratio(ref, dist, data_range=255)
        assert calculate_psnr(dist, ref, test_y_channel=False) == pytest.approx(expect_rgb, abs=1e-10)
    # An SR-like error on a real photo gives a plausible value.
    assert 20 < calculate_psnr(pairs[0][1], pairs[0][0]) < 40


def test_ssim_vs_skimage(pairs):
    for ref, dist in pairs:
        y_ref, y_dist = _y_independent(ref), _y_independent(dist)
        expect = structural_similarity(y_ref, y_dist, **SK_SSIM)
        assert calculate_ssim(dist, ref) == pytest.approx(expect, abs=1e-9)
        expect_rgb = structural_similarity(ref.astype(np.float64), dist.astype(np.float64), channel_axis=-1, **SK_SSIM)
        assert calculate_ssim(dist, ref, test_y_channel=False) == pytest.approx(expect_rgb, abs=1e-9)
    assert 0.5 < calculate_ssim(pairs[0][1], pairs[0][0]) < 0.99


def test_ssim_map_interior_equals_skimage_full_map(pairs):
    from megan_fast.metrics.psnr_ssim import _ssim_map

    ref, dist = pairs[1]
    a, b = _y_independent(ref), _y_independent(dist)
    _, full = structural_similarity(a, b, full=True, **SK_SSIM)
    ours = _ssim_map(a, b)
    assert ours.shape == (a.shape[0] - 10, a.shape[1] - 10)
    np.testing.assert_allclose(ours, full[5:-5, 5:-5], rtol=0, atol=1e-9)


def test_gaussian_window():
    g = gaussian_window()
    x = np.arange(-5, 6)
    ref = np.exp(-(x**2) / 4.5)
    np.testing.assert_allclose(g, ref / ref.sum(), rtol=0, atol=1e-15)


def test_crop_border(pairs):
    ref, dist = pairs[0]
    c = 4
    r, d = ref[c:-c, c:-c], dist[c:-c, c:-c]
    assert calculate_psnr(dist, ref, crop_border=c) == pytest.approx(calculate_psnr(d, r), abs=1e-12)
    assert calculate_ssim(dist, ref, crop_border=c) == pytest.approx(calculate_ssim(d, r), abs=1e-12)
    expect = structural_similarity(_y_independent(r), _y_independent(d), **SK_SSIM)
    assert calculate_ssim(dist, ref, crop_border=c) == pytest.approx(expect, abs=1e-9)
    assert calculate_psnr(dist, ref, crop_border=c) != pytest.approx(calculate_psnr(dist, ref), abs=1e-6)


def test_identical_images(pairs):
    ref = pairs[0][0]
    assert calculate_psnr(ref, ref) == math.inf
    assert calculate_ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert calculate_ssim(ref, ref, test_y_channel=False) == pytest.approx(1.0, abs=1e-12)
    t = torch.from_numpy(ref).permute(2, 0, 1).float() / 255
    assert psnr_y(t, t).item() == math.inf
    assert ssim_y(t, t).item() == pytest.approx(1.0, abs=1e-12)


def test_torch_matches_numpy(pairs):
    """Batched torch versions round to uint8 levels, then agree with the numpy ones."""
    g = torch.Generator().manual_seed(0)
    refs, preds = [], []
    for ref, dist in pairs[:2]:
        r = torch.from_numpy(ref[:64, :80]).permute(2, 0, 1).float() / 255
        # Unrounded float predictions, slightly out of range too (clamped first).
        p = torch.from_numpy(dist[:64, :80]).permute(2, 0, 1).float() / 255 + 0.004 * torch.randn(r.shape, generator=g)
        refs.append(r)
        preds.append(p)
    ref_b, pred_b = torch.stack(refs), torch.stack(preds)  # (2, 3, 64, 80)
    for border in (0, 3):
        ps, ss = psnr_y(pred_b, ref_b, crop_border=border), ssim_y(pred_b, ref_b, crop_border=border)
        assert ps.shape == (2,) and ss.shape == (2,) and ps.dtype == torch.float64
        for i in range(2):
            a, b = _to_uint8(pred_b[i]), _to_uint8(ref_b[i])
            assert ps[i].item() == pytest.approx(calculate_psnr(a, b, crop_border=border), abs=1e-6)
            assert ss[i].item() == pytest.approx(calculate_ssim(a, b, crop_border=border), abs=1e-9)
    # Leading dimensions are kept: (n, t, 3, h, w) -> (n, t).
    assert psnr_y(pred_b[None], ref_b[None]).shape == (1, 2)
    assert ssim_y(pred_b[None], ref_b[None]).shape == (1, 2)
    assert psnr_y(pred_b[0], ref_b[0]).shape == ()


def test_errors(pairs):
    ref = pairs[0][0]
    with pytest.raises(ValueError, match="same shape"):
        calculate_psnr(ref, ref[:-1])
    with pytest.raises(ValueError, match="crop_border"):
        calculate_psnr(ref, ref, crop_border=60)
    with pytest.raises(ValueError, match="crop_border"):
        calculate_ssim(ref, ref, crop_border=-1)
    with pytest.raises(ValueError, match="RGB"):
        calculate_psnr(ref[..., :2], ref[..., :2])
    with pytest.raises(ValueError, match="at least 11x11"):
        calculate_ssim(ref[:8, :8], ref[:8, :8])
    t = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"pred must be a tensor of shape \(\.\.\., 3, h, w\)"):
        psnr_y(torch.rand(2, 4, 16, 16), torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        ssim_y(t, t[..., :15])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_y(t, t, crop_border=3)
