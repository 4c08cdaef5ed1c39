"""LTX-2 training cache nodes: a dataset's text-encoder outputs and its video and sound latents, for the LTX-2
trainer.

The chain is Dataset Folder → LTX-2 Cache Text Encoder Outputs → LTX-2 Cache Latents → (LTX-2 trainer). The
descriptors passed along are the shared :class:`~cinetune.nodes.training.TextCache` and
:class:`~cinetune.nodes.training.TrainingData` with the LTX-2 cache layout
(:data:`~cinetune.training.samples.LTX2_CACHE_LAYOUT`), on their own socket types so that a Kandinsky 5 cache cannot
be wired into LTX-2 nodes. What is cached (ltx-trainer's preprocessing, reference ltx2.md §9.5):

- text: the projected Gemma features before the connectors, ``[1024, 3840]`` float32 with the bool mask ``[1024]``
  (left-padded), one entry per distinct caption plus the empty caption (caption dropout);
- latents: the normalised video latent ``[128, F', H', W']`` of each clip and, with audio on, its sound's latent
  ``[8, T, 16]`` (stereo, 16 kHz, trimmed/padded to the clip's duration).

Model versions: the LTX-2 loaders do not keep their file paths, so the ids in the keys fingerprint the loaded weights
(:func:`~cinetune.training.cache.weights_identity`): Gemma, the tokenizer size and the checkpoint's text projection
for text; the video VAE with its tiling (and the audio VAE with audio on) for latents. Another checkpoint, a
fine-tune or another dtype gives other keys, so a cache from another model is never reused.

For the trainer node: ``training_data.cached_samples()`` checks and finds the entries, :func:`ltx2_training_samples`
turns them into samples ``LTX2TrainingAdapter.load_batch`` takes, :func:`ltx2_empty_caption` gives the empty caption
for caption dropout; ``training_data.audio`` / ``.i2v`` / ``.frame_spec`` tell what was cached.

Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

from comfy_api.latest import io
from torch import Tensor

from ..ltx2.family import LTX2_LATENT_FORMAT
from ..ltx2.loader import LTX2VAEs
from ..ltx2.text import LTX2TextEncoder, encode_prompts
from ..training.cache import cache_latents, padded_text_entries, weights_identity
from ..training.data import MISSING_AUDIO, FrameSpec
from ..training.samples import (
    LTX2_CACHE_LAYOUT,
    CachedTrainSample,
    ltx2_empty_text_from_cache,
    ltx2_samples_from_cache,
)
from . import host
from .rules import LTX2_I2V_CLIP, FrameCount, NodeRules
from .training import (CacheNode, TextCache, TextCacheNode, TrainingData, allow_upscale_input, bucket_resolution_input,
                       clip_frames_input, frame_selection_input)
from .types import LTX2VAE, LTX2TextEncoder as LTX2TextEncoderType

CATEGORY = "Cinetune/LTX-2"

LTX2TextCacheType = io.Custom("CINETUNE_LTX2_TEXT_CACHE")
"""A :class:`~cinetune.nodes.training.TextCache` with the LTX-2 cache layout."""
LTX2TrainingDataType = io.Custom("CINETUNE_LTX2_TRAINING_DATA")
"""A :class:`~cinetune.nodes.training.TrainingData` with the LTX-2 cache layout."""


def ltx2_text_identity(encoder: LTX2TextEncoder) -> str:
    """Id of what makes LTX-2 text entries: Gemma's weights, the tokenizer's class and size, the token count and the
    checkpoint's text projection (:func:`~cinetune.training.cache.weights_identity`)."""
    tokenizer = encoder.tokenizer
    return weights_identity(encoder.gemma, encoder.projection, f"tokenizer={type(tokenizer).__name__}:{len(tokenizer)}",
                            f"max_length={encoder.max_length}")


def ltx2_vae_identity(vaes: LTX2VAEs, *, audio: bool) -> str:
    """Id of what makes LTX-2 latent entries: the video VAE's weights and tiling, and with ``audio`` the audio VAE's
    weights and mel front end."""
    video = vaes.video
    parts = [video.model, f"tiling={video.tiling}:{video.tile_size}/{video.tile_overlap}/{video.tile_frames}/"
                          f"{video.tile_frames_overlap}"]
    if audio:
        parts += [vaes.audio, f"mel={vaes.audio.config.mel}"]
    return weights_identity(*parts)


def ltx2_training_data(data: TrainingData) -> TrainingData:
    """``data`` when it was cached by LTX-2 Cache Latents.

    Raises:
        ValueError: another family's training data (names it and the nodes to use).
    """
    if not isinstance(data, TrainingData) or data.layout != LTX2_CACHE_LAYOUT:
        made = data.layout.describe() if isinstance(data, TrainingData) else type(data).__name__
        raise ValueError(f"the training data was cached by {made}, not by the LTX-2 cachers: connect LTX-2 Cache "
                         "Latents (after LTX-2 Cache Text Encoder Outputs).")
    return data


def ltx2_training_samples(data: TrainingData) -> list[CachedTrainSample]:
    """The LTX-2 samples of cached training data (:func:`~cinetune.training.samples.ltx2_samples_from_cache` of
    ``data.cached_samples()``): fields of ``LTX2Sample``, read from disk on access.

    Raises:
        ValueError: not LTX-2 training data. CacheError: entries missing, damaged or from another model (the message
            says which cacher to run). NoAudioError: clips without sound where sound was asked for.
    """
    return ltx2_samples_from_cache(ltx2_training_data(data).cached_samples())


def ltx2_empty_caption(data: TrainingData) -> tuple[Tensor, Tensor]:
    """The cached empty caption ``(features [L, D] float32, mask [L] bool)`` for caption dropout.

    Raises:
        ValueError: not LTX-2 training data. CacheError: the entry is missing or damaged.
    """
    data = ltx2_training_data(data)
    return ltx2_empty_text_from_cache(data.cache_dir, data.encoder_id)


class LTX2CacheText(TextCacheNode):
    LAYOUT = LTX2_CACHE_LAYOUT

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2CacheText",
            display_name="LTX-2 Cache Text Encoder Outputs",
            category=CATEGORY,
            description="Encodes every caption once with Gemma 3 and the LTX-2 text projection (1024 tokens, left "
                        "padded, before the connectors, as ltx-trainer caches them) and stores the results on disk. "
                        "Re-running encodes only new or changed captions.",
            inputs=cls.text_cache_inputs(LTX2TextEncoderType, "From LTX-2 Text Encoder Loader (its checkpoint must be "
                                                              "the one you train); moved back to the CPU when caching "
                                                              "is done.", "ltx2_dataset"),
            outputs=[LTX2TextCacheType.Output(display_name="text_cache")],
        )

    @classmethod
    def encoder_id(cls, text_encoder) -> str:
        return ltx2_text_identity(text_encoder)

    @classmethod
    def entries(cls, text_encoder):
        return padded_text_entries(lambda prompts: encode_prompts(text_encoder, prompts))


class LTX2CacheLatents(NodeRules, CacheNode):
    INPUT_RULES = {"frames": FrameCount(LTX2_LATENT_FORMAT)}
    NODE_RULES = (LTX2_I2V_CLIP,)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneLTX2CacheLatents",
            display_name="LTX-2 Cache Latents",
            category=CATEGORY,
            description="Selects clips, sorts them into aspect-ratio buckets (sides multiples of 32 px) and encodes "
                        "them with the LTX-2 video VAE, and their sound (stereo, 16 kHz) with the audio VAE, once. "
                        "Re-running encodes only new or changed clips; an interrupted run resumes where it stopped.",
            inputs=[
                LTX2TextCacheType.Input("text_cache", tooltip="From LTX-2 Cache Text Encoder Outputs."),
                LTX2VAE.Input("vae", tooltip="From LTX-2 VAE Loader (with its audio VAE when audio is on)."),
                clip_frames_input(LTX2_LATENT_FORMAT),
                frame_selection_input(" (not with audio: the motion plays faster than the sound)"),
                bucket_resolution_input(LTX2_LATENT_FORMAT.size_multiple),
                io.Boolean.Input("audio", default=True,
                                 tooltip="Also encode each clip's sound (its audio track, downmixed to stereo, 16 kHz, "
                                         "cut to the clip's duration) for audio+video training."),
                io.Boolean.Input("image_to_video", default=False,
                                 tooltip="Prepare image-to-video training: the clip's first latent frame becomes the "
                                         "condition (nothing more is encoded); needs clips of 9 frames or more."),
                allow_upscale_input(),
                io.Combo.Input("missing_audio", options=list(MISSING_AUDIO), default="error",
                               tooltip="With audio on, what to do with clips without sound (and images): 'error' "
                                       "names them and stops; 'silence' trains them with a silent track."),
                io.Float.Input("fps", default=0.0, min=0.0, max=240.0, step=0.001,
                               tooltip="0 keeps each clip's own frame rate (as ltx-trainer; images and clips without "
                                       "one get 24); a value resamples every clip to that rate."),
            ],
            outputs=[LTX2TrainingDataType.Output(display_name="training_data")],
        )

    @classmethod
    def execute(cls, text_cache, vae, frames, frame_selection, resolution, audio, image_to_video, allow_upscale,
                missing_audio="error", fps=0.0) -> io.NodeOutput:
        if not isinstance(text_cache, TextCache) or text_cache.layout != LTX2_CACHE_LAYOUT:
            made = text_cache.layout.describe() if isinstance(text_cache, TextCache) else type(text_cache).__name__
            raise ValueError(f"the text cache was made by {made}: connect LTX-2 Cache Text Encoder Outputs.")
        LTX2_I2V_CLIP.check(frames=frames, image_to_video=image_to_video)
        audio_vae = None
        if audio:
            audio_vae = vae.audio
            if audio_vae is None or audio_vae.vae.encoder is None:
                raise ValueError("audio is on, but the LTX-2 VAE has no audio encoder: load the LTX-2 checkpoint "
                                 "(with its audio_vae.encoder tensors) in LTX-2 VAE Loader, or turn audio off.")
        spec = FrameSpec(frames, frame_selection, target_fps=fps or None, latent_format=LTX2_LATENT_FORMAT)
        step = LTX2_LATENT_FORMAT.size_multiple
        vae_id = ltx2_vae_identity(vae, audio=audio)
        progress = host.Progress(1)
        with host.on_compute_device(vae):
            report = cache_latents(text_cache.dataset, vae.video, text_cache.cache_dir, vae_id=vae_id,
                                   frame_spec=spec, base_resolution=resolution, bucket_step=step,
                                   allow_upscale=allow_upscale, i2v=image_to_video, progress=progress.update,
                                   check_interrupt=host.check_interrupt, layout=LTX2_CACHE_LAYOUT,
                                   audio_vae=audio_vae, missing_audio=missing_audio)
        data = TrainingData(text_cache.dataset, text_cache.cache_dir, text_cache.encoder_id, vae_id, spec, resolution,
                            step, allow_upscale, image_to_video, LTX2_CACHE_LAYOUT, audio, missing_audio)
        return cls.output(dict(frames=frames, frame_selection=frame_selection, resolution=resolution, audio=audio,
                               image_to_video=image_to_video, allow_upscale=allow_upscale, missing_audio=missing_audio,
                               fps=fps), report, data)


NODES = [LTX2CacheText, LTX2CacheLatents]
