"""Data: MATLAB-style bicubic resizing, Vimeo-90K and frame-folder datasets, real-texture test clips.

``megan_fast.data.synthetic`` (clips from scikit-image's bundled photos) is
imported on use only: it needs scikit-image, which the library itself does not.
"""

from megan_fast.data.datasets import VideoFolderClips, Vimeo90KSeptuplet
from megan_fast.data.imresize import bicubic_downscale_x4, imresize
from megan_fast.images import IMAGE_EXTENSIONS, list_frames, read_image

list_images = list_frames  # the name before megan_fast.images became the one frame listing

__all__ = [
    "IMAGE_EXTENSIONS",
    "VideoFolderClips",
    "Vimeo90KSeptuplet",
    "bicubic_downscale_x4",
    "imresize",
    "list_frames",
    "list_images",
    "read_image",
]
