"""PSNR and SSIM as video super-resolution papers compute them (BasicSR's definitions).

Two forms:

- :func:`calculate_psnr` / :func:`calculate_ssim`: one image pair as numpy
  HWC arrays in [0, 255] (uint8, as read from disk), the form of BasicSR's
  ``calculate_psnr`` / ``calculate_ssim``.  **We take RGB channel order where
  BasicSR takes BGR** (it reads with OpenCV); the Y channel is the same
  luminance either way, as long as each function is given its own order.
- :func:`psnr_y` / :func:`ssim_y`: batched torch versions for (..., 3, h, w)
  float tensors in [0, 1], which round to uint8 levels first (the evaluation
  protocol scores the saved uint8 frames) and return one value per image.
  They agree with the numpy versions to ~1e-10 dB / 1e-12.

Definitions:

- Y channel: ITU-R BT.601 studio range, MATLAB ``rgb2ycbcr``:
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1]; Y lies
  in [16, 235] on the [0, 255] scale.  Computed in float64 (BasicSR computes
  it in float32; the difference is below 1e-4 dB).
- PSNR: ``10 log10(255^2 / MSE)`` on float64 values in [0, 255]; identical
  images give ``inf``.
- SSIM (Wang et al. 2004): local statistics under an 11x11 Gaussian window
  (sigma 1.5, normalised to sum 1), 'valid' filtering (no padding: the map is
  (h - 10, w - 10)), ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, population
  (biased) variances, the mean of the SSIM map; over the channels' mean when
  not on Y.
- ``crop_border``: that many pixels are removed from each side first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["rgb_to_y", "calculate_psnr", "calculate_ssim", "psnr_y", "ssim_y", "gaussian_window"]

_Y_WEIGHTS = (65.481, 128.553, 24.966)
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2
_WIN = 11
_SIGMA = 1.5


def gaussian_window(size: int = _WIN, sigma: float = _SIGMA) -> np.ndarray:
    """1-D Gaussian of ``size`` taps (centred, float64, sums to 1); SSIM uses its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def rgb_to_y(img):
    """Luma Y of BT.601 (MATLAB ``rgb2ycbcr``) from RGB in [0, 1]; returns Y on the [0, 255] scale.

    Args:
        img: numpy array (..., 3), channels last (HWC), or torch tensor
            (..., 3, h, w), channels at dim -3 (CHW); values in [0, 1].

    Returns:
        float64 numpy array (...) or tensor (..., h, w) (torch keeps its
        floating dtype), in [16, 235] for inputs in [0, 1].
    """
    if isinstance(img, Tensor):
        if img.dim() < 3 or img.shape[-3] != 3:
            raise ValueError(f"rgb_to_y: a tensor must have shape (..., 3, h, w), got {tuple(img.shape)}")
        x = img if img.is_floating_point() else img.double()
        r, g, b = x.unbind(-3)
        return 16.0 + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: an array must have shape (..., 3) (channels last), got {arr.shape}")
    return 16.0 + arr[..., 0] * _Y_WEIGHTS[0] + arr[..., 1] * _Y_WEIGHTS[1] + arr[..., 2] * _Y_WEIGHTS[2]


def _prepare(img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool, fn: str) -> tuple:
    """Checks a pair of [0, 255] images; returns float64 (h, w, c) arrays (c = 1 on Y)."""
    a, b = np.asarray(img), np.asarray(img2)
    if a.shape != b.shape:
        raise ValueError(f"{fn}: img and img2 must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"{fn}: img must be (h, w) or (h, w, c) (HWC), got shape {a.shape}")
    if not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(f"{fn}: crop_border must be a non-negative integer, got {crop_border!r}")
    h, w = a.shape[:2]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"{fn}: crop_border={crop_border} leaves nothing of a {h}x{w} image")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel:
        if a.shape[2] != 3:
            raise ValueError(f"{fn}: test_y_channel needs RGB images (h, w, 3), got shape {np.asarray(img).shape}")
        a = rgb_to_y(a / 255.0)[..., None]
        b = rgb_to_y(b / 255.0)[..., None]
    return a, b


def calculate_psnr(img: np.ndarray, img2: np.ndarray, crop_border: int = 0, test_y_channel: bool = True) -> float:
    """PSNR in dB of two images in [0, 255] (BasicSR's ``calculate_psnr``, RGB order).

    Args:
        img, img2: (h, w, 3) RGB uint8 arrays (or float arrays in [0, 255];
            (h, w) or (h, w, c) when ``test_y_channel`` is False).
        crop_border: pixels removed from each side before scoring.
        test_y_channel: score the BT.601 Y channel (else all channels together).

    Returns:
        PSNR in dB (max 255); ``inf`` for identical images.
    """
    a, b = _prepare(img, img2, crop_border, test_y_channel, "calculate_psnr")
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0**2 / mse))


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (h, w) ``x`` with the outer product g g^T."""
    k = len(g)
    h, w = x.shape
    rows = sum(g[i] * x[i : h - k + 1 + i] for i in range(k))
    return sum(g[i] * rows[:, i : w - k + 1 + i] for i in range(k))


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    g = gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
    return num / den


def calculate_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int = 0, test_y_channel: bool = True) -> float:
    """SSIM of two images in [0, 255] (BasicSR's ``calculate_ssim``, RGB order).

    Gaussian 11x11 window (sigma 1.5), 'valid' filtering, C1 = (0.01*255)^2,
    C2 = (0.03*255)^2, the mean of the map; the mean over channels when
    ``test_y_channel`` is False.

    Args:
        img, img2: (h, w, 3) RGB uint8 arrays (or float in [0, 255]); after
            cropping, h and w must be at least 11.
        crop_border: pixels removed from each side before scoring.
        test_y_channel: score the BT.601 Y channel.

    Returns:
        SSIM (1.0 for identical images).
    """
    a, b = _prepare(img, img2, crop_border, test_y_channel, "calculate_ssim")
    if min(a.shape[:2]) < _WIN:
        raise ValueError(f"calculate_ssim: images must be at least {_WIN}x{_WIN} after cropping, got {a.shape[:2]}")
    return float(np.mean([_ssim_map(a[..., c], b[..., c]).mean() for c in range(a.shape[2])]))


# --------------------------------------------------------------------------- batched torch versions


def _y_levels(x: Tensor, crop_border: int, fn: str, name: str) -> Tensor:
    """(..., 3, h, w) in [0, 1] -> float64 Y (..., h', w') of the uint8-rounded image."""
    if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[-3] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be a tensor of shape (..., 3, h, w) in [0, 1], got {shape}")
    if not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"{fn}: crop_border must be a non-negative integer, got {crop_border!r}")
    h, w = x.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"{fn}: crop_border={crop_border} leaves nothing of a {h}x{w} image")
    levels = x.detach().double().clamp(0, 1).mul(255).round()
    if crop_border:
        levels = levels[..., crop_border:-crop_border, crop_border:-crop_border]
    return rgb_to_y(levels / 255.0)


def _check_pair(pred: Tensor, target: Tensor, fn: str) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"{fn}: pred and target must have the same shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")


def psnr_y(pred: Tensor, target: Tensor, crop_border: int = 0) -> Tensor:
    """Y-channel PSNR per image of RGB tensors, rounded to uint8 levels first.

    Args:
        pred, target: (..., 3, h, w) floating tensors in [0, 1] (clamped).
        crop_border: pixels removed from each side.

    Returns:
        float64 tensor (...) of PSNR values in dB (``inf`` where identical),
        on the inputs' device.
    """
    _check_pair(pred, target, "psnr_y")
    a = _y_levels(pred, crop_border, "psnr_y", "pred")
    b = _y_levels(target.to(pred.device), crop_border, "psnr_y", "target")
    mse = (a - b).pow(2).mean(dim=(-2, -1))
    return 10.0 * torch.log10(255.0**2 / mse)  # mse = 0 gives inf


def ssim_y(pred: Tensor, target: Tensor, crop_border: int = 0) -> Tensor:
    """Y-channel SSIM per image of RGB tensors, rounded to uint8 levels first.

    Same definition as :func:`calculate_ssim` (11x11 Gaussian, sigma 1.5,
    'valid' filtering), computed in float64.

    Args:
        pred, target: (..., 3, h, w) floating tensors in [0, 1]; h and w at
            least 11 after cropping.
        crop_border: pixels removed from each side.

    Returns:
        float64 tensor (...) of SSIM values, on the inputs' device.
    """
    _check_pair(pred, target, "ssim_y")
    a = _y_levels(pred, crop_border, "ssim_y", "pred")
    b = _y_levels(target.to(pred.device), crop_border, "ssim_y", "target")
    lead = a.shape[:-2]
    h, w = a.shape[-2:]
    if min(h, w) < _WIN:
        raise ValueError(f"ssim_y: images must be at least {_WIN}x{_WIN} after cropping, got {h}x{w}")
    a = a.reshape(-1, 1, h, w)
    b = b.reshape(-1, 1, h, w)
    g = torch.from_numpy(gaussian_window()).to(a.device)
    gy, gx = g.view(1, 1, _WIN, 1), g.view(1, 1, 1, _WIN)

    def filt(x: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, gy), gx)

    # One pass over the five statistics stacked along the batch.
    n = a.shape[0]
    stats = filt(torch.cat([a, b, a * a, b * b, a * b], 0))
    mu_a, mu_b, ea2, eb2, eab = stats.split(n, 0)
    var_a, var_b, cov = ea2 - mu_a**2, eb2 - mu_b**2, eab - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
    return (num / den).mean(dim=(-3, -2, -1)).reshape(lead)
