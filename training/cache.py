"""Text-encoder and latent caches on disk for LoRA training.

A cache folder holds two sub-folders, each written by one cacher and read by the trainer::

    <cache_dir>/text/<key>.safetensors      "text" [L, D] float32 (valid tokens only), "pooled" [D2] float32
    <cache_dir>/text/manifest.json          what the entries are (caption, template, encoder id)
    <cache_dir>/latents/<key>.safetensors   "latent" [C, F', H', W'] float32 VAE latent as the VAE returns it,
                                            with i2v also "first" and "last" [C, 1, H', W']
    <cache_dir>/latents/<key>.failed.json   a clip whose frames could not be decoded (see below)
    <cache_dir>/latents/manifest.json       what the entries are (item, frame indices, bucket, VAE id)

Typical use (the cacher nodes and the trainer node are thin wrappers around this)::

    ds = scan_folder("dataset/")
    te_id = encoder_identity(*text_encoder_paths, dtype=torch.bfloat16)
    cache_text(ds, text_encoder, "cache/", encoder_id=te_id)
    vae_id = encoder_identity(vae_path, dtype=torch.float32)
    spec = FrameSpec(17, latent_format=fmt)       # fmt: the model family's LatentFormat
    cache_latents(ds, vae, "cache/", vae_id=vae_id, frame_spec=spec)
    samples = load_cached_dataset(ds, "cache/", encoder_id=te_id, vae_id=vae_id, frame_spec=spec)

The latent geometry (channels, down-scaling, frame rule, size multiple) comes from ``frame_spec.latent_format``
(:class:`~cinetune.core.family.LatentFormat`); nothing here is specific to one model.

The pieces: :mod:`cinetune.training.cache_store` (layouts, keys, model ids, manifests, entry files),
:mod:`cinetune.training.text_cache` (:func:`cache_text`), :mod:`cinetune.training.latent_cache`
(:func:`cache_latents`); this module finds and reads the cached samples. Every public name of those modules can be
imported from here too.

Decisions (sources: reference k5.md §5 and §8, musubi-tuner's cache scripts, the official Kandinsky 5 training
code):

- **Interruption**: every file is written atomically (temporary file + rename), ``check_interrupt()`` is called
  before each entry, ``progress(0, total)`` before the first and ``progress(done, total)`` after each (the cacher
  nodes drive the host's progress bar with it); an interrupted run leaves only complete entries and
  the next run skips them. An existing entry is checked by its header (tensor names, file length); a damaged
  one (truncated, unreadable, not safetensors) is encoded again.
- **Damaged is not missing.** :func:`load_cached_dataset` reports an entry whose file exists but fails that check
  as damaged (and says the cacher re-encodes exactly those), apart from entries that were never written. Each
  :class:`CacheReport` lists the entry files its dataset uses (``entries``), so a caller can tell later whether the
  files on disk are still the ones the cacher left (the cacher nodes re-run when they are not).

**Families and their layouts** (:class:`CacheLayout`, handed over by the family's nodes as a value). LTX-2, with
``LTX2_CACHE_LAYOUT`` and the readers of :mod:`cinetune.training.samples`::

    entry = padded_text_entries(lambda prompts: encode_prompts(text_encoder, prompts))   # cinetune.ltx2.text
    cache_text(ds, entry, "cache/", encoder_id=weights_identity(gemma, projection), layout=LTX2_CACHE_LAYOUT)
    spec = FrameSpec(49, target_fps=None, latent_format=LTX2_LATENT_FORMAT)               # each clip keeps its fps
    cache_latents(ds, vaes.video, "cache/", vae_id=vae_id, frame_spec=spec, layout=LTX2_CACHE_LAYOUT,
                  audio_vae=vaes.audio)
    samples = ltx2_samples_from_cache(load_cached_dataset(ds, "cache/", encoder_id=..., vae_id=vae_id,
                                                          frame_spec=spec, layout=LTX2_CACHE_LAYOUT, audio=True))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .cache_store import (
    _FAILED_SUFFIX,
    CACHE_VERSION,
    DEFAULT_LAYOUT,
    LATENT_DIR,
    MANIFEST,
    TEXT_DIR,
    CacheError,
    CacheLayout,
    CacheReport,
    InterruptFn,
    ProgressFn,
    TemplateFn,
    _exists,
    _is_complete,
    _listed,
    _load_entry,
    _Manifest,
    _template_function,
    _text_key,
    default_template,
    empty_text_path,
    encoder_identity,
    read_text,
    read_text_entry,
    weights_identity,
)
from .clip_audio import NoAudioError
from .frames import FrameSpec
from .items import Dataset, DatasetError, DatasetProblem
from .latent_cache import AudioVAELike, VAELike, _nothing_usable, _plan_latents, _settings, cache_latents
from .text_cache import TextEncoderLike, TextEntryFn, cache_text, padded_text_entries

__all__ = [
    "CACHE_VERSION", "CacheError", "CacheLayout", "DEFAULT_LAYOUT", "CachedSample", "CacheReport", "encoder_identity",
    "weights_identity", "default_template", "padded_text_entries", "cache_text", "cache_latents",
    "load_cached_dataset", "read_latent", "read_text", "read_text_entry", "empty_text_path",
    "TEXT_DIR", "LATENT_DIR", "MANIFEST", "ProgressFn", "InterruptFn", "TemplateFn", "TextEntryFn", "TextEncoderLike",
    "VAELike", "AudioVAELike",
]


@dataclass(frozen=True)
class CachedSample:
    """One training sample: one clip of one item in one bucket, with its cached latent and caption embedding.

    Attributes:
        key: latent key (64 hex chars, see the module notes).
        latent_path: safetensors file with "latent" ``[C, F', H', W']`` float32 VAE latent
            (``LatentFormat.latent_shape(bucket width, bucket height, frames)``); with i2v also "first" and "last"
            ``[C, 1, H', W']`` (read with :func:`read_latent`).
        text_key: text key of (caption, template, encoder id).
        text_path: safetensors file with "text" ``[L, D]`` and "pooled" ``[D2]`` float32 (read with :func:`read_text`).
        caption: the caption as encoded.
        item_id: the item's ``source_id``.
        bucket: ``(width, height)`` in pixels.
        frames: video frames in the clip (valid for the latent format; 1 for images).
        kind: ``"video"`` or ``"image"`` (the item's kind).
        repeats: how many times the sample counts per epoch.
        template: the prompt template the caption was encoded with; caption dropout uses
            ``empty_text_path(cache_dir, encoder_id, template, layout=layout)``.
        fps: the clip's frame rate (:func:`~cinetune.training.data.clip_fps`).
        audio: the latent file also holds ``"audio"`` ``[C_a, T, M]``.
        layout: the :class:`CacheLayout` the entries were cached with (its family, its text tensors).
    """

    key: str
    latent_path: Path
    text_key: str
    text_path: Path
    caption: str
    item_id: str
    bucket: tuple[int, int]
    frames: int
    kind: str
    repeats: int
    template: str = "video"
    fps: float | None = None
    audio: bool = False
    layout: CacheLayout = DEFAULT_LAYOUT


# ----------------------------------------------------------------------------------------------------- reading


def load_cached_dataset(dataset: Dataset, cache_dir: str | os.PathLike, *, encoder_id: str, vae_id: str,
                        frame_spec: FrameSpec, base_resolution: int | tuple[int, int] = 512,
                        bucket_step: int | None = None, allow_upscale: bool = False, i2v: bool = False,
                        template_for: TemplateFn | None = None, layout: CacheLayout = DEFAULT_LAYOUT,
                        audio: bool = False, missing_audio: str = "error") -> list[CachedSample]:
    """The cached training samples of a dataset, found by recomputing the keys (nothing is decoded or encoded).

    Pass the same settings as to :func:`cache_text` and :func:`cache_latents` (the same ``layout``; ``audio`` = an
    ``audio_vae`` was given, with the same ``missing_audio``). Clips the latent cacher reported as problems (too
    short, no bucket, failed to decode) are left out.

    Returns:
        One :class:`CachedSample` per clip, in dataset order (several per video in ``chunks`` mode).

    Raises:
        CacheError: latent or text entries are missing or damaged (also the empty-caption entry used for caption
            dropout); the message lists them (up to 10), counts the files there that other models made (naming
            their family and model id), and says which cacher to run with which settings.
        NoAudioError: with ``audio`` and ``missing_audio="error"``, items without an audio track.
        DatasetError: no clip is usable at all.
    """
    cache_dir = Path(cache_dir)
    s = _settings(vae_id, frame_spec, base_resolution, bucket_step, allow_upscale, i2v, layout, audio, missing_audio)
    template_for = _template_function(layout, template_for)
    try:
        jobs, _ = _plan_latents(dataset, s)
    except NoAudioError:
        raise
    except DatasetError as exc:
        raise _nothing_usable(list(dataset.problems) + [DatasetProblem(None, str(exc))]) from exc
    latent_dir, text_dir = cache_dir / LATENT_DIR, cache_dir / TEXT_DIR
    samples, missing_latents, missing_text = [], [], {}
    damaged_latents, damaged_text = [], {}
    templates: dict[str, None] = {}
    for job in jobs:
        item = job.clip.item
        latent_path = latent_dir / f"{job.key}.safetensors"
        template = template_for(item)
        templates[template] = None
        text_key = _text_key(item.caption, template, encoder_id, layout)
        text_path = text_dir / f"{text_key}.safetensors"
        if not _is_complete(latent_path, s.tensors):
            clip = f"{item.name} (frames {job.clip.indices[0]}..{job.clip.indices[-1]}, bucket {job.bucket})"
            if _exists(latent_path):
                damaged_latents.append(f"{latent_path.name}: {clip}")
            elif not (latent_dir / f"{job.key}{_FAILED_SUFFIX}").is_file():
                missing_latents.append(clip)
            continue
        if not _is_complete(text_path, layout.text_tensors):
            what = f"{item.caption!r} (template {template})"
            if _exists(text_path):
                damaged_text[text_key] = f"{text_path.name}: {what}"
            else:
                missing_text[text_key] = what
        samples.append(CachedSample(
            key=job.key, latent_path=latent_path, text_key=text_key, text_path=text_path, caption=item.caption,
            item_id=item.source_id, bucket=(job.bucket.width, job.bucket.height), frames=len(job.clip.indices),
            kind=item.kind, repeats=item.repeats, template=template, fps=job.fps, audio=s.audio, layout=layout))
    for template in templates:
        path = empty_text_path(cache_dir, encoder_id, template, layout=layout)
        if not _is_complete(path, layout.text_tensors):
            what = f"'' (empty caption for dropout, template {template})"
            if _exists(path):
                damaged_text[path.stem] = f"{path.name}: {what}"
            else:
                missing_text[path.stem] = what
    message = []
    if damaged_latents:
        message.append(f"{len(damaged_latents)} latent entries in {latent_dir} are damaged (truncated or "
                       "unreadable):\n" + _listed(damaged_latents) + "\nrun the latent cacher again (queue the "
                       "workflow again): it re-encodes exactly the damaged entries")
    if missing_latents:
        used = {latent_dir / f"{job.key}.safetensors" for job in jobs}
        others = len(set(latent_dir.glob("*.safetensors")) - used) if latent_dir.is_dir() else 0
        makers = _Manifest(latent_dir, "latent").other_models("vae_id", layout.family, vae_id)
        sound = f", audio {'on (missing audio: ' + missing_audio + ')' if audio else 'off'}"
        message.append(f"{len(missing_latents)} latent entries are missing from {latent_dir} ({others} files there "
                       f"are for other inputs or settings{makers}):\n" + _listed(missing_latents) +
                       "\nrun the latent cacher on this dataset with the same VAE, frame count/mode/fps, "
                       f"resolution {base_resolution}, bucket step {s.bucket_step}, upscaling "
                       f"{'on' if allow_upscale else 'off'} and i2v {'on' if i2v else 'off'}"
                       f"{sound if layout.family is not None or audio else ''}")
    if damaged_text:
        message.append(f"{len(damaged_text)} text entries in {text_dir} are damaged (truncated or unreadable):\n"
                       + _listed(list(damaged_text.values()))
                       + "\nrun the text cacher again (queue the workflow again): it re-encodes exactly the damaged "
                       "entries")
    if missing_text:
        makers = _Manifest(text_dir, "text").other_models("encoder_id", layout.family, encoder_id)
        message.append(f"{len(missing_text)} text entries are missing from {text_dir}"
                       f"{' (' + makers.removeprefix('; ') + ')' if makers else ''}:\n"
                       + _listed(list(missing_text.values()))
                       + "\nrun the text cacher on this dataset with the same text encoder files and dtype")
    if message:
        kind = "damaged" if not (missing_latents or missing_text) else "incomplete"
        raise CacheError(f"the cache is {kind}; " + "\n".join(message))
    if not samples:
        raise DatasetError(f"no usable clip in the dataset for {cache_dir}: every item was left out while caching "
                           "(see the latent cacher's report)")
    return samples


def read_latent(sample: CachedSample) -> dict[str, Tensor]:
    """Load a sample's latents.

    Returns:
        ``{"latent": [C, F', H', W']}`` plus ``"first"`` and ``"last"`` ``[C, 1, H', W']`` when cached with i2v and
        ``"audio"`` ``[C_a, T, M]`` when cached with sound; float32, CPU, as the VAEs returned them
        (``LatentFormat.to_model`` gives what the DiT works on).

    Raises:
        CacheError: file missing, truncated, without a 4-D "latent" (or the "audio" the sample needs), or made by
            another model family than the sample's layout (the message names it and says which cacher to run).
    """
    tensors = _load_entry(sample.latent_path, "latent", "latent cacher", sample.layout)
    latent = tensors.get("latent")
    if latent is None or latent.ndim != 4:
        raise CacheError(f"{sample.latent_path}: no 4-D 'latent' tensor; delete the file and run the latent cacher "
                         "again")
    audio = tensors.get("audio")
    if sample.audio and (audio is None or audio.ndim != 3):
        raise CacheError(f"{sample.latent_path}: no 3-D 'audio' tensor; delete the file and run the latent cacher "
                         "again with audio on")
    return {name: tensors[name].float() for name in ("latent", "first", "last", "audio") if name in tensors}
