"""Data: MATLAB-style bicubic resizing, Vimeo-90K and frame-folder datasets, real-texture test clips.

``megan_fast.data.synthetic`` (clips from scikit-image's bundled photos) is
imported on use only: it needs scikit-image, which the library itself does not.
"""

from megan_fast.data.datasets import IMAGE_EXTENSIONS, VideoFolderClips, Vimeo90KSeptuplet, list_images, read_image
from megan_fast.data.imresize import bicubic_downscale_x4, imresize

__all__ = [
    "IMAGE_EXTENSIONS",
    "VideoFolderClips",
    "Vimeo90KSeptuplet",
    "bicubic_downscale_x4",
    "imresize",
    "list_images",
    "read_image",
]
