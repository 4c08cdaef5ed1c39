"""Training nodes: dataset folder, combined datasets, text-encoder cache, latent cache (the trainer node lives in
nodes/trainer.py).

The nodes pass small descriptor objects along the chain (dataset → text cache → latent cache → trainer); the
tensors live on disk in the cache folder, keyed by content, so re-running a cacher only encodes what changed.

ComfyUI reuses a node's previous output while its inputs are unchanged, so a cache entry damaged on disk (truncated,
unreadable) would never be repaired by queueing again. Each cacher therefore remembers the entry files its last run
left (size and modification time) and its change check (``fingerprint_inputs``) differs once any of them changed:
the cacher runs again and re-encodes exactly the damaged entries. The memory lasts as long as the server, as
ComfyUI's own cache of outputs does.

A Dataset Folder may carry its own frame extraction (musubi-tuner's ``frame_extraction``, ``target_frames``,
``frame_stride``, ``frame_sample``, ``max_frames``; :class:`~cinetune.training.items.FrameExtraction`); the cachers
cut its videos by it instead of by their own ``frames`` / ``frame_selection``. At queue time its ``target_frames``
must parse and each count must fit the frame rule of at least one registered model family (K5 ``4k+1``, LTX-2
``8k+1``); the cacher of the family in use refuses a count its own rule does not allow before encoding anything.

Each node tells what it did (``ui`` text, in the prompt's history outputs too): the Dataset Folder and Combine
Datasets their items by kind and the files left out (:func:`~cinetune.training.data.dataset_summary`), the cachers
(of both families) their entries encoded, reused from the cache and the files skipped
(:meth:`~cinetune.training.cache.CacheReport.summary`); the cachers move the progress bar once per entry, starting
at 0 of the total. Frame counts and the other values a widget alone decides are checked when the prompt is queued
(:mod:`cinetune.nodes.rules`).

Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from comfy_api.latest import io, ui

from ..core.family import LatentFormat, registered_families
from ..k5.family import K5_LATENT_FORMAT, NABLA_SIZE_MULTIPLE
from ..training.cache import (
    DEFAULT_LAYOUT,
    CachedSample,
    CacheLayout,
    CacheReport,
    cache_latents,
    cache_text,
    load_cached_dataset,
)
from ..training.data import (
    EXTRACTION_MODES,
    Dataset,
    FrameExtraction,
    FrameSpec,
    combine_datasets,
    dataset_summary,
    parse_target_frames,
    resolve_dataset_folder,
    scan_folder,
)
from ..training.items import DEFAULT_MAX_FRAMES
from . import host
from .checks import CinetuneNode, FileName, check_file_name, widget_values
from .rules import K5_I2V_CLIP, FrameCount, NodeRules
from .types import K5VAE, K5TextEncoder

CATEGORY = "Cinetune/training"

DatasetType = io.Custom("CINETUNE_DATASET")
TextCacheType = io.Custom("CINETUNE_K5_TEXT_CACHE")
TrainingDataType = io.Custom("CINETUNE_K5_TRAINING_DATA")


@dataclass(frozen=True)
class TextCache:
    """A dataset whose captions are encoded in ``cache_dir`` by the encoder with id ``encoder_id``.

    Attributes:
        dataset: the scanned dataset. cache_dir: the cache folder (``text/`` and ``latents/`` below it).
        encoder_id: the text encoder's id (part of every text key).
        layout: the family's cache layout (:class:`~cinetune.training.cache.CacheLayout`; the default is Kandinsky
            5's, :data:`~cinetune.training.samples.LTX2_CACHE_LAYOUT` LTX-2's).
    """

    dataset: Dataset
    cache_dir: Path
    encoder_id: str
    layout: CacheLayout = DEFAULT_LAYOUT


@dataclass(frozen=True)
class TrainingData:
    """Everything the trainer needs to find the cached samples (see ``training.cache.load_cached_dataset``).

    Attributes:
        dataset, cache_dir, encoder_id, layout: as :class:`TextCache`.
        vae_id: the VAE's id (and the audio VAE's, with sound; part of every latent key).
        frame_spec: frames per clip, selection, fps and the family's latent format.
        base_resolution, bucket_step, allow_upscale: the buckets.
        i2v: image-to-video training was asked for when caching (Kandinsky 5: first/last frame latents cached;
            LTX-2: nothing more to cache, the clip's first latent frame is the condition).
        audio: the latents hold each clip's sound latent (``"audio"``). missing_audio: what was done with clips
            without sound (``"error"`` or ``"silence"``).
    """

    dataset: Dataset
    cache_dir: Path
    encoder_id: str
    vae_id: str
    frame_spec: FrameSpec
    base_resolution: int
    bucket_step: int
    allow_upscale: bool
    i2v: bool
    layout: CacheLayout = DEFAULT_LAYOUT
    audio: bool = False
    missing_audio: str = "error"

    def cached_samples(self) -> list[CachedSample]:
        """The cached samples (``training.cache.load_cached_dataset`` with these settings; nothing is encoded).

        Raises:
            CacheError: entries missing or damaged (the message says which cacher to run).
            NoAudioError: clips without sound where sound is needed.
            DatasetError: nothing usable.
        """
        return load_cached_dataset(
            self.dataset, self.cache_dir, encoder_id=self.encoder_id, vae_id=self.vae_id, frame_spec=self.frame_spec,
            base_resolution=self.base_resolution, bucket_step=self.bucket_step, allow_upscale=self.allow_upscale,
            i2v=self.i2v, layout=self.layout, audio=self.audio,
            missing_audio=self.missing_audio)


CACHE_NAME = FileName()


def cache_directory(name: str) -> Path:
    """``<ComfyUI output>/cinetune/cache/<name>``.

    Raises:
        InputError: ``name`` is not a plain folder name (:data:`CACHE_NAME`).
    """
    return host.output_directory() / "cinetune" / "cache" / check_file_name(name, CACHE_NAME, "cache_name")


def dataset_folder(folder: str) -> Path:
    """The dataset folder a widget value names: inside ComfyUI's input folder or a dataset root
    (:func:`cinetune.training.data.resolve_dataset_folder`).

    Raises:
        DatasetLocationError: outside those places (the message says how to add a dataset root).
        DatasetError: the folder does not exist.
    """
    return resolve_dataset_folder(folder, input_dir=host.input_directory())


class _Receipts:
    """What each cacher's last runs left on disk: ``(node id, widget settings)`` → cache folder → entry file →
    ``(size, mtime_ns)``. Keyed by the widget settings because a change check sees only those (linked inputs arrive
    as None); one record per cache folder keeps two cachers with equal settings from overwriting each other's."""

    def __init__(self):
        self._runs: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}

    @staticmethod
    def _key(node: type[CinetuneNode], inputs: dict) -> str:
        return json.dumps([node.define_schema().node_id, widget_values(node, inputs)], sort_keys=True, default=str)

    @staticmethod
    def _state(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def record(self, node: type[CinetuneNode], inputs: dict, report: CacheReport) -> None:
        """Remember the entry files of ``report`` as the output of ``node`` run with ``inputs``."""
        files = {str(p): self._state(str(p)) for p in report.entries}
        self._runs.setdefault(self._key(node, inputs), {})[str(report.cache_dir)] = files

    def fingerprint(self, node: type[CinetuneNode], inputs: dict) -> str:
        """The same value as long as every remembered entry file is unchanged (and before any run)."""
        key = self._key(node, inputs)
        changed = sorted(path for folder in self._runs.get(key, {}).values()
                         for path, state in folder.items() if self._state(path) != state)
        return hashlib.sha256(json.dumps([key, changed]).encode()).hexdigest()


RECEIPTS = _Receipts()

#: The Dataset Folder's ``frame_extraction`` options: "cacher" = the cacher's frames and frame selection (as before
#: the option existed), then musubi-tuner's modes.
EXTRACTION_CHOICES = ("cacher", *EXTRACTION_MODES)
MAX_CLIP_FRAMES = 1025


def check_target_frames(value: str) -> None:
    """Input rule for ``target_frames``: parsable counts, each valid for at least one registered model family.

    Raises:
        ValueError: unparsable text, or a count no family's frame rule allows (naming each family's nearest counts).
    """
    families = registered_families()
    for n in parse_target_frames(value):
        if n > MAX_CLIP_FRAMES:
            raise ValueError(f"{n} frames is more than the {MAX_CLIP_FRAMES} a clip may have")
        if families and not any(f.latent_format.valid_frames(n) for f in families):
            hints = "; ".join("{} needs {}: {} or {}".format(f.display_name, f.latent_format.frame_rule,
                                                             *f.latent_format.nearest_frames(n)) for f in families)
            raise ValueError(f"{n} frames fits no model family's frame rule ({hints})")


def _frame_extraction(mode: str, target_frames: str, frame_stride: int, frame_sample: int,
                     max_frames: int) -> FrameExtraction | None:
    """The Dataset Folder's widgets as a :class:`~cinetune.training.items.FrameExtraction`; None for "cacher".

    Raises:
        ValueError: bad counts or settings (the message names them).
    """
    if mode == "cacher":
        return None
    return FrameExtraction(mode, parse_target_frames(target_frames), frame_stride, frame_sample, max_frames)


class CacheNode(CinetuneNode):
    """Base of the cache nodes of both families: ComfyUI runs one again once an entry file its last run left has
    changed (:data:`RECEIPTS`, module notes)."""

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return RECEIPTS.fingerprint(cls, inputs)

    @classmethod
    def output(cls, widgets: dict[str, Any], report: CacheReport, value: Any) -> io.NodeOutput:
        """The node's output ``value`` with ``report``'s summary as its text, after remembering the entry files
        ``report`` lists as the output of this node with these widget values (``widgets``)."""
        RECEIPTS.record(cls, widgets, report)
        return io.NodeOutput(value, ui=ui.PreviewText(report.summary()))


class TextCacheNode(CacheNode):
    """Base of both families' text cachers (inputs: :meth:`text_cache_inputs`). A family sets its cache ``LAYOUT``
    and gives its encoder's id (:meth:`encoder_id`) and, where the encoder itself is not what
    :func:`~cinetune.training.cache.cache_text` encodes with, the entry function (:meth:`entries`)."""

    INPUT_RULES = {"cache_name": CACHE_NAME}
    LAYOUT: ClassVar[CacheLayout] = DEFAULT_LAYOUT

    @staticmethod
    def text_cache_inputs(text_encoder: Any, tooltip: str, cache_name: str) -> list:
        """``dataset``, the ``text_encoder`` socket (with ``tooltip``) and ``cache_name`` (default ``cache_name``)."""
        return [
            DatasetType.Input("dataset", tooltip="From Dataset Folder."),
            text_encoder.Input("text_encoder", tooltip=tooltip),
            io.String.Input("cache_name", default=cache_name,
                            tooltip="Folder under output/cinetune/cache holding this dataset's caches."),
        ]

    @classmethod
    def encoder_id(cls, text_encoder: Any) -> str:
        """The id of what makes this family's text entries (part of every text key)."""
        raise NotImplementedError

    @classmethod
    def entries(cls, text_encoder: Any) -> Any:
        """What :func:`~cinetune.training.cache.cache_text` encodes with: the encoder itself unless a family says
        otherwise."""
        return text_encoder

    @classmethod
    def execute(cls, dataset, text_encoder, cache_name) -> io.NodeOutput:
        cache_dir = cache_directory(cache_name)
        encoder_id = cls.encoder_id(text_encoder)
        entries = cls.entries(text_encoder)
        progress = host.Progress(1)
        with host.on_compute_device(text_encoder):
            report = cache_text(dataset, entries, cache_dir, encoder_id=encoder_id, progress=progress.update,
                                check_interrupt=host.check_interrupt, layout=cls.LAYOUT)
        return cls.output({"cache_name": cache_name}, report, TextCache(dataset, cache_dir, encoder_id, cls.LAYOUT))


def clip_frames_input(latent_format: LatentFormat) -> io.Int.Input:
    """A latent cacher's ``frames`` per clip (default 49) in steps of the family's temporal factor."""
    return io.Int.Input("frames", default=49, min=1, max=MAX_CLIP_FRAMES, step=latent_format.temporal_factor,
                        tooltip=f"Video frames per training clip, {latent_format.frame_rule} (at 24 fps: 49 ≈ 2 s, "
                                "121 = 5 s). Images are 1-frame clips. A Dataset Folder with its own frame "
                                "extraction uses this only where its target_frames is empty.")


def frame_selection_input(uniform_note: str = "") -> io.Combo.Input:
    """A latent cacher's ``frame_selection`` (head, uniform, chunks); ``uniform_note`` is added to uniform's
    description."""
    return io.Combo.Input("frame_selection", options=["head", "uniform", "chunks"], default="head",
                          tooltip=f"head: one clip from the start; uniform: one clip spread over the whole "
                                  f"video{uniform_note}; chunks: consecutive clips covering the video. Not used for a "
                                  "Dataset Folder with its own frame extraction.")


def bucket_resolution_input(step: int, note: str = "") -> io.Int.Input:
    """A latent cacher's bucket ``resolution`` (default 512) in steps of ``step`` px (``note`` adds to the
    tooltip's step)."""
    return io.Int.Input("resolution", default=512, min=64, max=2048, step=step,
                        tooltip=f"Bucket area = resolution²; each item goes to the bucket with the nearest aspect "
                                f"ratio (sides in steps of {step} px{note}).")


def allow_upscale_input() -> io.Boolean.Input:
    """A latent cacher's ``allow_upscale`` switch (default off)."""
    return io.Boolean.Input("allow_upscale", default=False,
                            tooltip="Allow buckets larger than an item (upscaling); off keeps smaller items small.")


class DatasetFolder(CinetuneNode):
    INPUT_RULES = {"folder": dataset_folder, "target_frames": check_target_frames}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneDatasetFolder",
            display_name="Dataset Folder",
            category=CATEGORY,
            description="A folder of videos (mp4, mov, webm, mkv, gif) and images with same-name .txt captions, "
                        "searched recursively.",
            inputs=[
                io.String.Input("folder", default="",
                                tooltip="A folder inside ComfyUI's input folder (e.g. 'my_dataset'), or an absolute "
                                        "path inside a dataset root the server owner lists in CINETUNE_DATASET_ROOTS."),
                io.Int.Input("repeats", default=1, min=1, max=10000,
                             tooltip="How many times each item counts per epoch."),
                io.String.Input("trigger_word", default="",
                                tooltip="Prepended to every caption as 'trigger, caption' (left out when empty)."),
                io.String.Input("default_caption", default="",
                                tooltip="Caption for files without a .txt; when empty such files are skipped and "
                                        "listed as problems."),
                io.Combo.Input("frame_extraction", options=list(EXTRACTION_CHOICES), default="cacher", optional=True,
                               tooltip="How this folder's videos become clips (musubi-tuner's frame_extraction). "
                                       "cacher: the cache node's frames and frame_selection. head: the first N "
                                       "frames. chunk: consecutive N-frame clips. slide: N-frame clips every "
                                       "frame_stride frames. uniform: frame_sample N-frame clips spread over the "
                                       "video. full: the whole video up to max_frames. Each clip is a sample."),
                io.String.Input("target_frames", default="", optional=True,
                                tooltip="Frames per clip N, one or more, e.g. '1, 25, 45' (K5: 4k+1, LTX-2: 8k+1); "
                                        "each count gives its own clips. Empty: the cache node's frames. Not used by "
                                        "'cacher' and 'full'."),
                io.Int.Input("frame_stride", default=1, min=1, max=100000, optional=True,
                             tooltip="slide: frames from one clip's start to the next."),
                io.Int.Input("frame_sample", default=1, min=1, max=1000, optional=True,
                             tooltip="uniform: clips per video for each frame count."),
                io.Int.Input("max_frames", default=DEFAULT_MAX_FRAMES, min=1, max=MAX_CLIP_FRAMES, optional=True,
                             tooltip="full: the longest clip; each video is cut to the longest count the model "
                                     "family allows (K5 4k+1, LTX-2 8k+1) up to this."),
            ],
            outputs=[DatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, repeats, trigger_word, default_caption, **extraction):
        # Re-run (and so re-cache and re-train downstream) only when a file in the folder changed.
        try:
            root = dataset_folder(folder)
        except ValueError:
            return float("nan")  # let execute() report the problem
        entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in root.rglob("*") if p.is_file())
        settings = (entries, repeats, trigger_word, default_caption, sorted(extraction.items()))
        return hashlib.sha256(repr(settings).encode()).hexdigest()

    @classmethod
    def execute(cls, folder, repeats, trigger_word, default_caption, frame_extraction="cacher", target_frames="",
                frame_stride=1, frame_sample=1, max_frames=DEFAULT_MAX_FRAMES) -> io.NodeOutput:
        extraction = _frame_extraction(frame_extraction, target_frames, frame_stride, frame_sample, max_frames)
        dataset = scan_folder(dataset_folder(folder), repeats=repeats, trigger_word=trigger_word,
                              default_caption=default_caption or None, frame_extraction=extraction)
        return io.NodeOutput(dataset, ui=ui.PreviewText(dataset_summary(dataset)))


class CombineDatasets(CinetuneNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        tip = ("A dataset (Dataset Folder or another Combine Datasets); it keeps its own repeats, trigger word, "
               "captions and frame extraction.")
        return io.Schema(
            node_id="CinetuneCombineDatasets",
            display_name="Combine Datasets",
            category=CATEGORY,
            description="Trains on several datasets at once. Item names get their folder's name in front, so equal "
                        "file names in different folders stay apart. Both families' cache nodes take the result.",
            inputs=[
                DatasetType.Input("dataset_1", tooltip=tip),
                DatasetType.Input("dataset_2", tooltip=tip),
                DatasetType.Input("dataset_3", optional=True, tooltip=tip + " Optional."),
                DatasetType.Input("dataset_4", optional=True, tooltip=tip + " Optional."),
            ],
            outputs=[DatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, dataset_1, dataset_2, dataset_3=None, dataset_4=None) -> io.NodeOutput:
        dataset = combine_datasets([d for d in (dataset_1, dataset_2, dataset_3, dataset_4) if d is not None])
        return io.NodeOutput(dataset, ui=ui.PreviewText(dataset_summary(dataset)))


class K5CacheText(TextCacheNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5CacheText",
            display_name="K5 Cache Text Encoder Outputs",
            category=CATEGORY,
            description="Encodes every caption once with Qwen2.5-VL + CLIP and stores the results on disk. Re-running "
                        "encodes only new or changed captions.",
            inputs=cls.text_cache_inputs(K5TextEncoder, "From K5 Text Encoder Loader; moved back to the CPU when "
                                                        "caching is done.", "k5_dataset"),
            outputs=[TextCacheType.Output(display_name="text_cache")],
        )

    @classmethod
    def encoder_id(cls, text_encoder) -> str:
        return text_encoder.identity  # set by K5 Text Encoder Loader


class K5CacheLatents(NodeRules, CacheNode):
    INPUT_RULES = {"frames": FrameCount(K5_LATENT_FORMAT)}
    NODE_RULES = (K5_I2V_CLIP,)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneK5CacheLatents",
            display_name="K5 Cache Latents",
            category=CATEGORY,
            description="Selects clips, sorts them into aspect-ratio buckets and encodes them with the VAE once. "
                        "Re-running encodes only new or changed clips; an interrupted run resumes where it stopped.",
            inputs=[
                TextCacheType.Input("text_cache", tooltip="From K5 Cache Text Encoder Outputs."),
                K5VAE.Input("vae", tooltip="From K5 VAE Loader."),
                clip_frames_input(K5_LATENT_FORMAT),
                frame_selection_input(),
                bucket_resolution_input(K5_LATENT_FORMAT.size_multiple, f", {NABLA_SIZE_MULTIPLE} px with NABLA"),
                io.Boolean.Input("nabla", default=False,
                                 tooltip="Use 128 px bucket steps, required to train with NABLA attention."),
                io.Boolean.Input("image_to_video", default=False,
                                 tooltip="Also encode each clip's first and last frame alone, for image-to-video "
                                         "training; needs clips of 5 frames or more."),
                allow_upscale_input(),
            ],
            outputs=[TrainingDataType.Output(display_name="training_data")],
        )

    @classmethod
    def execute(cls, text_cache, vae, frames, frame_selection, resolution, nabla, image_to_video,
                allow_upscale) -> io.NodeOutput:
        K5_I2V_CLIP.check(frames=frames, image_to_video=image_to_video)
        spec = FrameSpec(target_frames=frames, mode=frame_selection, latent_format=K5_LATENT_FORMAT)
        step = NABLA_SIZE_MULTIPLE if nabla else K5_LATENT_FORMAT.size_multiple
        progress = host.Progress(1)
        with host.on_compute_device(vae):
            report = cache_latents(text_cache.dataset, vae, text_cache.cache_dir, vae_id=vae.identity,
                                   frame_spec=spec, base_resolution=resolution, bucket_step=step,
                                   allow_upscale=allow_upscale, i2v=image_to_video, progress=progress.update,
                                   check_interrupt=host.check_interrupt)
        data = TrainingData(text_cache.dataset, text_cache.cache_dir, text_cache.encoder_id, vae.identity, spec,
                            resolution, step, allow_upscale, image_to_video)
        return cls.output(dict(frames=frames, frame_selection=frame_selection, resolution=resolution, nabla=nabla,
                               image_to_video=image_to_video, allow_upscale=allow_upscale), report, data)


NODES = [DatasetFolder, CombineDatasets, K5CacheText, K5CacheLatents]
