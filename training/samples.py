"""Training samples as the loop sees them, and samples read lazily from a training cache.

The loop reads four fields of a sample (:class:`TrainSample`); everything else (latents, text embeddings, audio,
frame rate) is read by the model family's training adapter, which names the fields it needs
(:attr:`cinetune.training.adapter.TrainingAdapter.sample_fields`; in-memory sample classes: ``K5Sample`` in
``cinetune.k5.train``, ``LTX2Sample`` in ``cinetune.ltx2.train``).

:class:`CachedTrainSample` exposes a cached dataset entry (:mod:`cinetune.training.cache`) under those names, reading
the files on access so a dataset never sits in memory as a whole:

- Kandinsky 5 (the default cache layout): a latent file with ``latent``/``first``/``last`` and a text file with
  ``text``/``pooled`` → the fields of ``K5Sample``;
- LTX-2 (:data:`LTX2_CACHE_LAYOUT`): a latent file with ``latent`` ``[128, F', H', W']`` (normalised) and, with
  sound, ``audio`` ``[8, T, 16]``, a text file with ``text`` ``[1024, 3840]`` (projected Gemma features) and
  ``text_mask`` bool ``[1024]``, and the clip's ``fps`` → the fields of ``LTX2Sample``
  (:func:`ltx2_samples_from_cache`, :func:`ltx2_empty_text_from_cache`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Protocol

from torch import Tensor

from .cache import CacheError, CacheLayout, CachedSample, empty_text_path, read_latent, read_text, read_text_entry

__all__ = ["TrainSample", "CachedTrainSample", "samples_from_cache", "empty_texts_from_cache", "LTX2_FAMILY_NAME",
           "LTX2_CACHE_LAYOUT", "ltx2_samples_from_cache", "ltx2_empty_text_from_cache"]

#: The LTX-2 family's name (``cinetune.ltx2.family.LTX2_FAMILY.name``), written into its cache keys.
LTX2_FAMILY_NAME = "ltx-2"

#: How LTX-2 caches look: keys with the family, text entries of the whole padded sequence with its mask, one
#: template (LTX-2 prompts have none, so a caption is encoded once for videos and images alike), and no separate
#: first/last frame latents for image-to-video (ltx-trainer conditions on the clip's first latent frame).
LTX2_CACHE_LAYOUT = CacheLayout(family=LTX2_FAMILY_NAME, text_tensors=("text", "text_mask"), template="plain",
                                i2v_frames=False)


class TrainSample(Protocol):
    """What the loop reads from a sample (duck-typed).

    Attributes:
        bucket: ``(width, height)`` in pixels. frames: video frames of the clip (1 for images). Samples of one
            ``(bucket, frames)`` group share their latent shape and may share a micro-batch.
        item_id: a name for messages. repeats: how often the sample counts per epoch (≥ 1; optional, default 1).
    """

    bucket: tuple[int, int]
    frames: int
    item_id: str


_UNSET = object()


class CachedTrainSample:
    """Adapter from a :class:`cinetune.training.cache.CachedSample` to :class:`TrainSample`, reading on access.

    ``latent`` reads the latent file (``cache.read_latent``) each time and keeps only the small ``first``/``last``
    frames and ``audio`` latent; ``text`` reads the text file (``cache.read_text_entry``) and keeps only the small
    rest of the entry (``pooled`` or ``text_mask``). So a dataset never sits in memory as a whole. A field the cache
    does not hold reads as None.

    Attributes:
        bucket, frames, item_id, repeats, template: from the cached sample.
        fps: the clip's frame rate (None for caches that did not record it).

    Raises (on access):
        CacheError: a cache file is missing, damaged or made by another model family (from the cache module).
    """

    def __init__(self, cached: Any) -> None:
        self.cached = cached
        self.bucket = tuple(int(v) for v in cached.bucket)
        self.frames = int(cached.frames)
        self.item_id = str(cached.item_id)
        self.repeats = int(cached.repeats)
        self.template = str(getattr(cached, "template", "video"))
        fps = getattr(cached, "fps", None)
        self.fps = None if fps is None else float(fps)
        self._layout: CacheLayout = getattr(cached, "layout", CacheLayout())
        self._latent_extras: Any = _UNSET
        self._text_extras: Any = _UNSET

    def _read_latents(self) -> Tensor:
        data = read_latent(self.cached)
        self._latent_extras = {k: data.get(k) for k in ("first", "last", "audio")}
        return data["latent"]

    def _latent_extra(self, name: str) -> Tensor | None:
        if self._latent_extras is _UNSET:
            self._read_latents()
        return self._latent_extras[name]

    @property
    def latent(self) -> Tensor:
        return self._read_latents()

    @property
    def first(self) -> Tensor | None:
        return self._latent_extra("first")

    @property
    def last(self) -> Tensor | None:
        return self._latent_extra("last")

    @property
    def audio(self) -> Tensor | None:
        return self._latent_extra("audio")

    def _read_text(self) -> Tensor:
        data = read_text_entry(self.cached.text_path, self._layout)
        self._text_extras = {k: v for k, v in data.items() if k != "text"}
        return data["text"]

    def _text_extra(self, name: str) -> Tensor | None:
        if self._text_extras is _UNSET:
            self._read_text()
        return self._text_extras.get(name)

    @property
    def text(self) -> Tensor:
        return self._read_text()

    @property
    def pooled(self) -> Tensor | None:
        return self._text_extra("pooled")

    @property
    def text_mask(self) -> Tensor | None:
        return self._text_extra("text_mask")

    def __repr__(self) -> str:
        return f"CachedTrainSample({self.item_id!r}, bucket={self.bucket}, frames={self.frames})"


def samples_from_cache(cached_samples: Iterable[Any]) -> list[CachedTrainSample]:
    """Wrap the ``CachedSample`` list of ``cache.load_cached_dataset`` for
    :func:`~cinetune.training.trainer.train_lora` (order kept)."""
    return [CachedTrainSample(c) for c in cached_samples]


def empty_texts_from_cache(samples: Iterable[Any], cache_dir: str | os.PathLike,
                           encoder_id: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The cached empty-caption embeddings ``{template: (text [L, D], pooled [D2])}`` for the templates the samples
    use (``cache.empty_text_path`` + ``cache.read_text``), for caption dropout (default cache layout).

    Raises:
        CacheError: an empty-caption entry is missing (run the text cacher).
    """
    templates = sorted({str(getattr(s, "template", "video")) for s in samples}) or ["video"]
    return {t: read_text(empty_text_path(cache_dir, encoder_id, t)) for t in templates}


def ltx2_samples_from_cache(cached_samples: Iterable[CachedSample]) -> list[CachedTrainSample]:
    """LTX-2 training samples from the ``CachedSample`` list of ``cache.load_cached_dataset`` run with
    :data:`LTX2_CACHE_LAYOUT` (order kept).

    Each result has the fields of ``cinetune.ltx2.train.LTX2Sample`` and reads its files on access: ``latent``
    ``[128, F', H', W']`` float32 (normalised), ``text`` ``[L, D]`` float32 (L = 1024, D = 3840 for 19B),
    ``text_mask`` bool ``[L]`` (left padding False), ``fps``, ``bucket``, ``frames``, ``item_id``, ``repeats`` and
    ``audio`` ``[8, T, 16]`` float32 when cached with sound (None otherwise). ``LTX2TrainingAdapter.load_batch``
    takes them as they are.

    Raises:
        CacheError: a sample was cached for another model family or layout (e.g. a Kandinsky 5 cache); the message
            names the family that made it and says which cachers to run.
    """
    samples = []
    for cached in cached_samples:
        layout = getattr(cached, "layout", None)
        if layout != LTX2_CACHE_LAYOUT:
            made_by = layout.describe() if isinstance(layout, CacheLayout) else f"a {type(cached).__name__}"
            raise CacheError(f"sample {getattr(cached, 'item_id', '?')!r} comes from a cache made by {made_by}, not "
                             "by the LTX-2 cachers: a cache from another model is never reused. Cache the dataset "
                             "with LTX-2 Cache Text Encoder Outputs and LTX-2 Cache Latents.")
        samples.append(CachedTrainSample(cached))
    return samples


def ltx2_empty_text_from_cache(cache_dir: str | os.PathLike, encoder_id: str) -> tuple[Tensor, Tensor]:
    """The cached empty caption ``""`` of an LTX-2 text cache, for caption dropout (``empty_text`` of
    ``train_lora`` with the LTX-2 adapter).

    Returns:
        ``(features [L, D] float32, mask [L] bool)``.

    Raises:
        CacheError: the entry is missing or damaged (run the LTX-2 text cacher), or made by another family.
    """
    entry = read_text_entry(empty_text_path(cache_dir, encoder_id, layout=LTX2_CACHE_LAYOUT), LTX2_CACHE_LAYOUT)
    return entry["text"], entry["text_mask"]
