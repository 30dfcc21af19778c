"""Video and frame-folder I/O for ``megan-fast upscale``: reading (:mod:`~megan_fast.video.reading`), the encoder
of an output (:mod:`~megan_fast.video.encoders`), writing (:mod:`~megan_fast.video.writing`).

Frames are (3, H, W) float32 RGB tensors in [0, 1], as displayed, read and
written at the source's bit depth; ``-`` as INPUT or OUTPUT is a YUV4MPEG2
stream on standard input or output (docs/DESIGN.md section 5).
"""

from megan_fast.video.encoders import VIDEO_OUTPUTS, Encoder, choose_encoder, parse_option
from megan_fast.video.reading import PIPE, Colour, FrameReader, VideoError, VideoInfo, count_frames, probe, read_frames
from megan_fast.video.writing import (UNSUPPORTED_OUTPUTS, FrameFolderWriter, VideoWriter, check_video_output,
                                      join_segments, output_format)

__all__ = ["Colour", "Encoder", "FrameFolderWriter", "FrameReader", "PIPE", "UNSUPPORTED_OUTPUTS", "VIDEO_OUTPUTS",
           "VideoError", "VideoInfo", "VideoWriter", "check_video_output", "choose_encoder", "count_frames", "join_segments",
           "output_format",
           "parse_option", "probe", "read_frames"]
