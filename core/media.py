"""Video and audio file I/O with PyAV: H.264/AAC mp4 writing, decoding to uint8 frames or float waveforms, probing.

Frames are ComfyUI IMAGE layout ``[F, H, W, 3]`` (RGB, channels last); waveforms are ``[C, S]`` float32 in
-1..1 (channels first, as ComfyUI AUDIO's ``waveform[i]``).

The code lives in one module per job; this module gathers their public names:

- :mod:`cinetune.core.media_write`: H.264/AAC mp4 writing (its docstring holds the encoding decisions).
- :mod:`cinetune.core.media_read`: decoding frames and waveforms from files, probing streams.
- :mod:`cinetune.core.media_waveform`: channel mixing and sample-rate conversion in torch (the audio decisions).
- :mod:`cinetune.core.media_image`: conditioning images for image-to-video (cover-crop, H.264 round trip).
- :mod:`cinetune.core.media_errors`: :class:`MediaError`.
"""

from .media_errors import MediaError
from .media_image import fit_image, h264_round_trip
from .media_read import count_decodable_frames, decode_frames, probe_audio, probe_video, read_audio, read_video
from .media_waveform import mix_channels, resample
from .media_write import AAC_BIT_RATE_PER_CHANNEL, AAC_SAMPLE_RATES, H264_ENCODERS, write_video

__all__ = ["MediaError", "H264_ENCODERS", "AAC_SAMPLE_RATES", "write_video", "read_video", "probe_video",
           "read_audio", "probe_audio", "mix_channels", "resample", "AAC_BIT_RATE_PER_CHANNEL",
           "count_decodable_frames", "decode_frames", "fit_image", "h264_round_trip"]
