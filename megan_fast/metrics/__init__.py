"""Image quality metrics of the evaluation protocol (docs/DESIGN.md section 4): Y-channel PSNR and SSIM."""

from megan_fast.metrics.psnr_ssim import calculate_psnr, calculate_ssim, gaussian_window, psnr_y, rgb_to_y, ssim_y

__all__ = ["calculate_psnr", "calculate_ssim", "gaussian_window", "psnr_y", "rgb_to_y", "ssim_y"]
