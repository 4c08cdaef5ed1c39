"""Training samples as the loop sees them, and samples read lazily from a training cache.

The loop reads four fields of a sample (:class:`TrainSample`); everything else (latents, text embeddings, audio,
frame rate) is read by the model family's training adapter, which names the fields it needs
(:attr:`cinetune.training.adapter.TrainingAdapter.sample_fields`; in-memory sample classes: ``K5Sample`` in
``cinetune.k5.train``, ``LTX2Sample`` in ``cinetune.ltx2.train``).

:class:`CachedTrainSample` exposes a cached Kandinsky 5 dataset entry (:mod:`cinetune.training.cache`: a latent
file with ``latent``/``first``/``last`` and a text file with ``text``/``pooled``) under those names, reading the
files on access so a dataset never sits in memory as a whole.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Protocol

from torch import Tensor

__all__ = ["TrainSample", "CachedTrainSample", "samples_from_cache", "empty_texts_from_cache"]


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
    frames; ``text`` reads the text file (``cache.read_text``) and keeps only ``pooled``. So a dataset never sits in
    memory as a whole.

    Raises (on access):
        CacheError: a cache file is missing or damaged (from the cache module).
    """

    def __init__(self, cached: Any) -> None:
        self.cached = cached
        self.bucket = tuple(int(v) for v in cached.bucket)
        self.frames = int(cached.frames)
        self.item_id = str(cached.item_id)
        self.repeats = int(cached.repeats)
        self.template = str(getattr(cached, "template", "video"))
        self._first: Any = _UNSET
        self._last: Any = _UNSET
        self._pooled: Any = _UNSET

    def _read_latents(self) -> Tensor:
        from .cache import read_latent

        data = read_latent(self.cached)
        self._first, self._last = data.get("first"), data.get("last")
        return data["latent"]

    @property
    def latent(self) -> Tensor:
        return self._read_latents()

    @property
    def first(self) -> Tensor | None:
        if self._first is _UNSET:
            self._read_latents()
        return self._first

    @property
    def last(self) -> Tensor | None:
        if self._last is _UNSET:
            self._read_latents()
        return self._last

    @property
    def text(self) -> Tensor:
        from .cache import read_text

        text, self._pooled = read_text(self.cached.text_path)
        return text

    @property
    def pooled(self) -> Tensor:
        if self._pooled is _UNSET:
            self.text  # noqa: B018 - reads the file and keeps pooled
        return self._pooled

    def __repr__(self) -> str:
        return f"CachedTrainSample({self.item_id!r}, bucket={self.bucket}, frames={self.frames})"


def samples_from_cache(cached_samples: Iterable[Any]) -> list[CachedTrainSample]:
    """Wrap the ``CachedSample`` list of ``cache.load_cached_dataset`` for
    :func:`~cinetune.training.trainer.train_lora` (order kept)."""
    return [CachedTrainSample(c) for c in cached_samples]


def empty_texts_from_cache(samples: Iterable[Any], cache_dir: str | os.PathLike,
                           encoder_id: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The cached empty-caption embeddings ``{template: (text [L, D], pooled [D2])}`` for the templates the samples
    use (``cache.empty_text_path`` + ``cache.read_text``), for caption dropout.

    Raises:
        CacheError: an empty-caption entry is missing (run the text cacher).
    """
    from .cache import empty_text_path, read_text

    templates = sorted({str(getattr(s, "template", "video")) for s in samples}) or ["video"]
    return {t: read_text(empty_text_path(cache_dir, encoder_id, t)) for t in templates}

