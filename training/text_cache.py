"""The text cacher: every distinct caption of a dataset encoded once into ``<cache_dir>/text/``.

See :mod:`cinetune.training.cache` for the cache as a whole and :mod:`cinetune.training.cache_store` for keys and
entry files.

- **Templates**: video items use the prompt template ``"video"``, one-frame items (images) ``"image"``; pass
  ``template_for`` to choose otherwise (musubi-tuner picks one template per dataset: ``"video"`` if any item has
  more than one frame). The empty caption ``""`` is cached for every template in use, for caption dropout
  (:func:`~cinetune.training.cache_store.empty_text_path`).
- **One prompt per encoder call**, so an entry never depends on which other captions were encoded with it
  (padding in a batch can change the last bits) and interruption loses at most one entry.
- **Text entries** hold the tensors the layout names (``text_tensors``): ``"text"`` ``[L, D]`` float32 always first;
  the default layout keeps the L valid tokens and ``"pooled"`` ``[D2]`` (above); a family whose encoder needs the
  padded sequence stores it whole with a bool ``"text_mask"`` ``[L]`` (LTX-2: ``[1024, 3840]`` projected Gemma
  features, left-padded, as ltx-trainer's ``conditions/*.pt``). The family's encoding is a function
  ``(caption, template) → {name: tensor}`` handed to :func:`cache_text`. A layout with one ``template`` encodes each
  caption once for every item, images included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ..core.checkpoint import save_file_atomic
from .cache_store import (
    DEFAULT_LAYOUT,
    TEXT_DIR,
    CacheLayout,
    CacheReport,
    InterruptFn,
    ProgressFn,
    TemplateFn,
    _is_complete,
    _Manifest,
    _metadata,
    _shape_of,
    _subfolder,
    _template_function,
    _text_key,
    _tick,
)
from .items import Dataset, DatasetError

__all__ = ["TextEntryFn", "TextEncoderLike", "cache_text", "padded_text_entries"]


#: A family's text encoding for :func:`cache_text`: ``(caption, template) → {tensor name: tensor}`` of one entry.
TextEntryFn = Callable[[str, str], Mapping[str, Tensor]]


class TextEncoderLike(Protocol):
    """What :func:`cache_text` needs: ``encode(prompts, template)`` → object with ``text``, ``text_mask``,
    ``pooled`` (the text encoder wrapper of a model family)."""

    def encode(self, prompts: list[str], template: str = "video"): ...


# ------------------------------------------------------------------------------------------------ text cache


def _text_entries(dataset: Dataset, template_for: TemplateFn) -> list[tuple[str, str]]:
    """Distinct (caption, template) pairs in item order, then ("", template) for each template used."""
    pairs: dict[tuple[str, str], None] = {}
    templates: dict[str, None] = {}
    for item in dataset.items:
        template = template_for(item)
        if not isinstance(template, str) or not template:
            raise ValueError(f"template_for returned {template!r} for {item.name}; return a template name "
                             "such as 'video' or 'image'")
        pairs[(item.caption, template)] = None
        templates[template] = None
    for template in templates:
        pairs[("", template)] = None
    return list(pairs)


def cache_text(dataset: Dataset, encoder: TextEncoderLike | TextEntryFn, cache_dir: str | os.PathLike, *,
               encoder_id: str, template_for: TemplateFn | None = None, progress: ProgressFn | None = None,
               check_interrupt: InterruptFn | None = None, layout: CacheLayout = DEFAULT_LAYOUT) -> CacheReport:
    """Encode every distinct caption of a dataset (and the empty caption) once and store the embeddings.

    One entry per distinct (caption, template): template from ``template_for(item)`` (default: the layout's one
    template, else :func:`~cinetune.training.cache_store.default_template`: ``"video"`` for videos, ``"image"`` for images), plus ``""`` for each
    template in use. Entries already in ``<cache_dir>/text/`` (same key, complete file) are skipped. Each entry is
    encoded alone and written atomically, on CPU, with the caption, template, encoder id and family in the file's
    metadata:

    - an ``encoder`` object (:class:`TextEncoderLike`, the default layout): ``encoder.encode([caption], template)``,
      stored as ``"text"`` ``[L, D]`` (the L valid tokens, float32) and ``"pooled"`` ``[D2]`` float32;
    - a function ``(caption, template) → {name: tensor}`` (:data:`TextEntryFn`, a family's own encoding): its
      tensors, exactly the layout's ``text_tensors``, ``"text"`` ``[L, D]`` float (stored float32), others as
      returned (float tensors as float32, bool masks as bool).

    Args:
        dataset: from :func:`~cinetune.training.data.scan_folder` or ``from_tensors``.
        encoder: a loaded text encoder wrapper or an entry function (above), on any device; it is not moved.
        cache_dir: cache folder (created if missing); entries go to its ``text/`` sub-folder.
        encoder_id: from :func:`~cinetune.training.cache_store.encoder_identity` or :func:`~cinetune.training.cache_store.weights_identity` for the text-encoder weights and dtype.
        template_for: ``item → template name``; None = the layout's template or :func:`~cinetune.training.cache_store.default_template`.
        progress: called as ``progress(0, total)`` before the first entry and ``progress(done, total)`` after each
            (total = distinct entries).
        check_interrupt: called before each entry; whatever it raises propagates (complete entries stay).
        layout: the family's :class:`CacheLayout` (its family goes into the keys).

    Returns:
        :class:`CacheReport` (``problems`` = the dataset's scan problems; text encoding adds none).

    Raises:
        DatasetError: the dataset has no items.
        ValueError: ``template_for`` returns something that is not a template name (the encoder raises for unknown
            names), or the encoder returns unexpected tensors or shapes (nothing is written for that entry).
        TypeError: ``encoder`` is neither an encoder object nor a function.
        NotADirectoryError: ``cache_dir`` is a file.
    """
    if not dataset.items:
        raise DatasetError("the dataset has no items; scan a folder with captioned videos or images first")
    encode = _entry_function(encoder, layout)
    entries = _text_entries(dataset, _template_function(layout, template_for))
    folder = _subfolder(cache_dir, TEXT_DIR)
    manifest = _Manifest(folder, "text")
    written = skipped = 0
    paths: list[Path] = []
    if progress is not None:
        progress(0, len(entries))
    try:
        for done, (caption, template) in enumerate(entries, start=1):
            _tick(check_interrupt)
            key = _text_key(caption, template, encoder_id, layout)
            path = folder / f"{key}.safetensors"
            info = {"file": path.name, "caption": caption, "template": template, "encoder_id": encoder_id,
                    "family": layout.family}
            if _is_complete(path, layout.text_tensors):
                skipped += 1
            else:
                save_file_atomic(encode(caption, template), path, metadata=_metadata(
                    "text", layout, caption=caption, template=template, encoder_id=encoder_id))
                written += 1
            manifest.add(key, {**info, "tokens": _shape_of(path, "text")[0]})
            paths.append(path)
            if progress is not None:
                progress(done, len(entries))
    finally:
        manifest.save()
    return CacheReport(written, skipped, list(dataset.problems), Path(cache_dir), paths, kind="text")


def _entry_function(encoder, layout: CacheLayout) -> Callable[[str, str], dict[str, Tensor]]:
    """``(caption, template) → checked CPU tensors`` of one text entry, for either kind of ``encoder``."""
    if hasattr(encoder, "encode"):
        if layout.text_tensors != DEFAULT_LAYOUT.text_tensors:
            raise TypeError(f"a text encoder object gives 'text' and 'pooled' entries, but the layout holds "
                            f"{', '.join(layout.text_tensors)}: pass the family's entry function instead")
        return lambda caption, template: _valid_tokens(encoder, caption, template)
    if not callable(encoder):
        raise TypeError(f"encoder must be a text encoder (with encode(prompts, template)) or a function (caption, "
                        f"template) → tensors, got {type(encoder).__name__}")

    def entry(caption: str, template: str) -> dict[str, Tensor]:
        tensors = dict(encoder(caption, template))
        if tuple(sorted(tensors)) != tuple(sorted(layout.text_tensors)):
            raise ValueError(f"the text entry function returned {sorted(tensors)}, but the cache layout holds "
                             f"{list(layout.text_tensors)}")
        text = tensors["text"]
        if not isinstance(text, Tensor) or text.ndim != 2 or not text.is_floating_point():
            got = f"{text.dtype} {list(text.shape)}" if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"the text entry function returned 'text' {got}; expected float [L, D]")
        out = {}
        for name, value in tensors.items():
            value = value.detach().to("cpu")
            out[name] = value.float() if value.is_floating_point() else value
        return {k: v.contiguous() for k, v in out.items()}

    return entry


def padded_text_entries(encode: Callable[[list[str]], tuple[Tensor, Tensor]]) -> TextEntryFn:
    """The text-entry function (:data:`TextEntryFn`) of an encoder that returns the whole padded sequence and its
    mask, for layouts with ``text_tensors=("text", "text_mask")`` (LTX-2: ``cinetune.ltx2.text.encode_prompts``).

    Args:
        encode: ``[caption] → (features [1, L, D] float, mask [1, L])`` (mask True = real token), on any device.

    Returns:
        ``(caption, template) → {"text": [L, D] float32, "text_mask": [L] bool}`` on CPU (the template is not used).
        Raises ``ValueError`` when ``encode`` returns other shapes or a mask without a real token.
    """
    def entry(caption: str, template: str) -> dict[str, Tensor]:
        features, mask = encode([caption])
        if (not isinstance(features, Tensor) or not isinstance(mask, Tensor) or features.ndim != 3
                or features.shape[0] != 1 or tuple(mask.shape) != tuple(features.shape[:2])):
            shapes = [list(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (features, mask)]
            raise ValueError(f"the text encoder returned features and mask of shapes {shapes[0]} and {shapes[1]}; "
                             "expected [1, L, D] and [1, L]")
        mask = mask[0].detach().to("cpu").bool()
        if not bool(mask.any()):
            raise ValueError(f"the text encoder's mask for {caption!r} marks no real token")
        return {"text": features[0].detach().to("cpu", torch.float32).contiguous(), "text_mask": mask.contiguous()}

    return entry


def _valid_tokens(encoder: TextEncoderLike, caption: str, template: str) -> dict[str, Tensor]:
    out = encoder.encode([caption], template)
    text, mask, pooled = out.text, out.text_mask, out.pooled
    if text.ndim != 3 or mask.shape != text.shape[:2] or pooled.ndim != 2 or text.shape[0] != 1:
        raise ValueError(f"text encoder returned text {tuple(text.shape)}, mask {tuple(mask.shape)}, pooled "
                         f"{tuple(pooled.shape)}; expected [1, L, D], [1, L], [1, D2]")
    valid = text[0][mask[0].bool()]
    return {"text": valid.detach().to("cpu", torch.float32).contiguous(),
            "pooled": pooled[0].detach().to("cpu", torch.float32).contiguous()}
