"""Conditioning images for image-to-video: cover-scale and centre-crop, and the H.264 round trip of a still."""

from __future__ import annotations

import io

import av
import torch
from torch import Tensor
from torch.nn import functional as F

from .media_errors import MediaError
from .media_write import _encoder_options, _h264_encoder


def fit_image(image: Tensor, width: int, height: int) -> Tensor:
    """Scale an image to cover ``width × height`` (aspect ratio kept) and centre-crop it: the conditioning image of
    image-to-video.

    Scaling is bilinear (antialiased when shrinking) to the smallest size that covers the target, then the centre
    ``width × height`` is kept — as kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` ``resize_video`` and
    Lightricks/LTX-2 ``ltx_pipelines/utils/media_io.py`` (resize to cover, centre crop) prepare start images.

    Args:
        image: ``[H, W, 3]`` or ``[B, H, W, 3]`` (the first image is used), float 0..1 (ComfyUI IMAGE) or uint8.
        width, height: target size in pixels, positive.

    Returns:
        ``[1, 3, 1, height, width]`` float32 on the CPU in [−1, 1] (``x/127.5 − 1``; the VAE's ``[B, C, T, H, W]``).

    Raises:
        ValueError: not a tensor, wrong rank, not 3 channels, empty image or a bad target size.
    """
    if not isinstance(image, Tensor):
        raise ValueError(f"the image must be a torch tensor (ComfyUI IMAGE), got {type(image).__name__}")
    if isinstance(width, bool) or isinstance(height, bool) or int(width) != width or int(height) != height \
            or width < 1 or height < 1:
        raise ValueError(f"target size must be positive whole pixels, got {width}×{height}")
    width, height = int(width), int(height)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"the image must be [H, W, 3] or [B, H, W, 3] (RGB, channels last), got shape "
                         f"{tuple(image.shape)}; drop an alpha channel with image[..., :3]")
    if 0 in image.shape:
        raise ValueError(f"the image is empty: shape {tuple(image.shape)}")
    pixels = image[:1].detach().cpu()
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    pixels = pixels.permute(0, 3, 1, 2)
    src_h, src_w = pixels.shape[-2:]
    scale = max(height / src_h, width / src_w)
    # max() guards against float rounding making the covering size one pixel short.
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    pixels = pixels[..., top:top + height, left:left + width].clamp(0.0, 1.0)
    return (pixels * 2.0 - 1.0)[:, :, None].contiguous()


def h264_round_trip(pixels: Tensor, crf: int) -> Tensor:
    """Encode one frame as H.264 at ``crf`` and decode it again: the compression artefacts a video frame has.

    LTX-2 conditions image-to-video on images passed through this round trip (CRF 33 in the official pipelines),
    so a sharp still looks like the first frame of a video the model was trained on (Lightricks/LTX-2
    ``ltx_pipelines/utils/media_io.py`` ``preprocess``; ComfyUI ``LTXVPreprocess``).

    Args:
        pixels: ``[1, 3, 1, H, W]`` float in [−1, 1] (as :func:`fit_image` returns), H and W even.
        crf: constant rate factor 0..51; 0 returns the input unchanged.

    Returns:
        The decoded frame, same shape, float32 in [−1, 1].

    Raises:
        MediaError: wrong shape, odd size, a CRF outside 0..51, or no H.264 encoder.
    """
    if not isinstance(pixels, Tensor) or pixels.ndim != 5 or pixels.shape[:3] != (1, 3, 1):
        raise MediaError(f"pixels must be [1, 3, 1, H, W], got {tuple(getattr(pixels, 'shape', ()))}")
    if isinstance(crf, bool) or int(crf) != crf or not 0 <= crf <= 51:
        raise MediaError(f"crf must be a whole number 0..51, got {crf!r}")
    if crf == 0:
        return pixels.float()
    height, width = pixels.shape[-2:]
    if height % 2 or width % 2:
        raise MediaError(f"H.264 (yuv420p) needs an even width and height, got {width}×{height}")
    frame = ((pixels[0, :, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    buffer = io.BytesIO()
    name = _h264_encoder()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=1, options=_encoder_options(name, int(crf)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")))
        container.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    out = torch.from_numpy(decoded).permute(2, 0, 1).float() / 127.5 - 1.0
    return out[None, :, None].contiguous()
