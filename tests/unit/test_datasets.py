"""Datasets with their own frame extraction (musubi-tuner's modes) and combined datasets: clip planning, the family's
frame rule, sound checks, ids, fingerprints and the latent cache of a combined dataset."""

from __future__ import annotations

import hashlib
import json
import shutil
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cinetune.k5.family import K5_LATENT_FORMAT
from cinetune.ltx2.family import LTX2_LATENT_FORMAT
from cinetune.training.cache import cache_latents, cache_text, load_cached_dataset, read_latent
from cinetune.training.data import (
    Dataset,
    DatasetError,
    FrameExtraction,
    FrameSpec,
    TooShortError,
    check_clip_audio,
    check_extraction,
    combine_datasets,
    dataset_fingerprint,
    frame_indices,
    from_tensors,
    parse_target_frames,
    plan_clips,
    scan_folder,
)

K5, LTX2 = K5_LATENT_FORMAT, LTX2_LATENT_FORMAT
BBB_FRAMES, BBB_FPS = 132, 25.0


def windows(n: int, extraction: FrameExtraction, fmt=K5, default: int = 1) -> list[tuple[int, int]]:
    """(start, length) of each clip of an n-frame video without fps resampling."""
    clips = frame_indices(n, None, FrameSpec(default, target_fps=None, latent_format=fmt), extraction)
    for clip in clips:
        assert clip == list(range(clip[0], clip[0] + len(clip)))  # consecutive frames
    return [(clip[0], len(clip)) for clip in clips]


def resampled_count(frames: int, source_fps: float, target_fps: float) -> int:
    """Frames after resampling: target frames i whose nearest source frame floor(i·src/tgt + 1/2) exists."""
    ratio = Fraction(source_fps) / Fraction(target_fps)
    return sum(1 for i in range(4 * frames) if int(i * ratio + Fraction(1, 2)) < frames)


# ------------------------------------------------------------------------------------------ settings and parsing


def test_target_frames_parse_as_musubi_lists():
    assert parse_target_frames("1, 25, 45") == (1, 25, 45)
    assert parse_target_frames("[45, 25 1;25]") == (1, 25, 45)
    assert parse_target_frames("  ") == ()
    for bad in ("9, x", "0", "-5", "2.5", "9,,1e3"):
        with pytest.raises(ValueError, match="target_frames"):
            parse_target_frames(bad)


def test_extraction_settings_are_checked():
    assert FrameExtraction("slide", (25, 1, 25), frame_stride=10).target_frames == (1, 25)
    with pytest.raises(ValueError, match="frame_extraction"):
        FrameExtraction("chunks")
    for kwargs in ({"frame_stride": 0}, {"frame_sample": 0}, {"max_frames": 0}, {"target_frames": (0,)},
                   {"frame_stride": True}, {"frame_stride": 1.5}):
        with pytest.raises(ValueError, match="≥ 1"):
            FrameExtraction("slide", **kwargs)


# ------------------------------------------------------------------------------------------ the musubi modes

# musubi-tuner's docs/dataset_config.md draws each mode on a 40-frame video; these are its diagrams as
# (start, length) pairs.
DOC_VIDEO = 40


def test_head_chunk_and_slide_match_the_musubi_diagrams():
    assert windows(DOC_VIDEO, FrameExtraction("head", (1, 13, 25))) == [(0, 1), (0, 13), (0, 25)]
    assert windows(DOC_VIDEO, FrameExtraction("chunk", (13, 25))) == [(0, 13), (13, 13), (26, 13), (0, 25)]
    assert windows(DOC_VIDEO, FrameExtraction("slide", (1, 13, 25), frame_stride=10)) == [
        (0, 1), (10, 1), (20, 1), (30, 1), (0, 13), (10, 13), (20, 13), (0, 25), (10, 25)]


def test_uniform_starts_are_numpys_integer_linspace():
    # the diagram's 13- and 25-frame rows; the 1-frame row follows musubi's code (numpy.linspace)
    got = windows(DOC_VIDEO, FrameExtraction("uniform", (1, 13, 25), frame_sample=4))
    assert got[4:] == [(0, 13), (9, 13), (18, 13), (27, 13), (0, 25), (5, 25), (10, 25), (15, 25)]
    for n in range(1, 60, 3):
        for t in (1, 5, 9, 21):
            for samples in range(1, 9):
                if t > n:
                    continue
                expected = sorted(set(np.linspace(0, n - t, samples, dtype=int).tolist()))
                assert windows(n, FrameExtraction("uniform", (t,), frame_sample=samples)) == [(s, t) for s in expected]


def test_full_is_cut_to_the_family_rule_and_max_frames():
    # musubi's "three videos of 20, 25 and 35 frames, max_frames 31" example, with K5's 4k+1 and LTX-2's 8k+1
    for n, k5, ltx2 in ((20, 17, 17), (25, 25, 25), (35, 29, 25)):
        assert windows(n, FrameExtraction("full", max_frames=31)) == [(0, k5)]
        assert windows(n, FrameExtraction("full", max_frames=31), LTX2) == [(0, ltx2)]
    assert windows(3, FrameExtraction("full")) == [(0, 1)]


def test_lengths_that_do_not_fit_are_skipped_and_none_fitting_is_too_short():
    assert windows(20, FrameExtraction("head", (9, 45))) == [(0, 9)]
    with pytest.raises(TooShortError, match="needs 25 frames but only 20") as err:
        windows(20, FrameExtraction("slide", (25, 45)))
    assert (err.value.needed, err.value.available, err.value.largest_valid) == (25, 20, 17)


def test_empty_target_frames_take_the_cachers_count():
    assert windows(40, FrameExtraction("chunk"), default=13) == [(0, 13), (13, 13), (26, 13)]


def test_counts_outside_the_family_rule_are_refused_with_the_nearest_ones():
    slide = FrameExtraction("slide", (1, 13, 25), frame_stride=10)
    check_extraction(slide, K5)  # 4k+1
    with pytest.raises(ValueError, match=r"8k\+1.*13 → 9 or 17") as err:
        check_extraction(slide, LTX2)
    assert "25" not in str(err.value).split("asks for")[1].split("frames")[0]  # only the bad count is named
    with pytest.raises(ValueError, match="13 → 9 or 17"):
        windows(40, slide, LTX2)
    check_extraction(FrameExtraction("full", max_frames=30), LTX2)  # full cuts to the rule itself


def test_extraction_runs_on_the_resampled_frames():
    n = resampled_count(BBB_FRAMES, BBB_FPS, 24.0)
    spec = FrameSpec(9, target_fps=24.0, latent_format=K5)
    timeline = frame_indices(BBB_FRAMES, BBB_FPS, FrameSpec(n - (n - 1) % 4, target_fps=24.0, latent_format=K5))[0]
    clips = frame_indices(BBB_FRAMES, BBB_FPS, spec, FrameExtraction("slide", (9,), frame_stride=40))
    assert [c[0] for c in clips] == [timeline[s] for s in range(0, n - 9 + 1, 40)]
    assert all(c == timeline[timeline.index(c[0]):timeline.index(c[0]) + 9] for c in clips)
    full = frame_indices(BBB_FRAMES, BBB_FPS, spec, FrameExtraction("full", max_frames=1025))
    assert full == [timeline]


# ------------------------------------------------------------------------------------------ datasets


def _folder(root: Path, test_data, names=("bbb", "astronaut")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = test_data[name]
        shutil.copy(src, root / f"{name}{src.suffix}")
        (root / f"{name}.txt").write_text(f"{name} in {root.name}")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory, test_data):
    root = tmp_path_factory.mktemp("datasets")
    return SimpleNamespace(a=_folder(root / "a", test_data), b=_folder(root / "b", test_data),
                           other_a=_folder(root / "other" / "a", test_data, names=("coffee",)))


def test_plan_clips_uses_each_items_own_extraction(folders):
    slide = FrameExtraction("slide", (9, 17), frame_stride=40)
    combined = combine_datasets([scan_folder(folders.a, frame_extraction=slide), scan_folder(folders.b)])
    spec = FrameSpec(17, "head", 24.0, latent_format=K5)
    clips, problems = plan_clips(combined, spec)
    n = resampled_count(BBB_FRAMES, BBB_FPS, 24.0)
    expected_a = [t for t in (9, 17) for _ in range(0, n - t + 1, 40)]
    lengths = [(clip.item.source_id, len(clip.indices)) for clip in clips]
    assert lengths == ([("a/astronaut.png", 1)] + [("a/bbb.mp4", t) for t in expected_a]
                       + [("b/astronaut.png", 1), ("b/bbb.mp4", 17)])
    assert problems == []
    with pytest.raises(ValueError, match="13 → 9 or 17"):
        plan_clips(combine_datasets([scan_folder(folders.a, frame_extraction=FrameExtraction("head", (13,))),
                                     scan_folder(folders.b)]), FrameSpec(17, latent_format=LTX2))


def documented_fingerprint(dataset: Dataset) -> str:
    """The fingerprint recipe of dataset_fingerprint's docstring, as it was before extractions existed."""
    rows = [[i.source_id, i.path.stat().st_size, i.path.stat().st_mtime_ns, i.caption, i.repeats]
            for i in sorted(dataset.items, key=lambda i: i.source_id)]
    text = json.dumps({"version": 1, "items": rows}, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_a_dataset_without_extraction_hashes_as_before_and_one_with_it_does_not(folders):
    plain = scan_folder(folders.a)
    assert dataset_fingerprint(plain) == documented_fingerprint(plain)
    carried = scan_folder(folders.a, frame_extraction=FrameExtraction("chunk", (17,)))
    assert dataset_fingerprint(carried) != dataset_fingerprint(plain)
    assert dataset_fingerprint(carried) != dataset_fingerprint(
        scan_folder(folders.a, frame_extraction=FrameExtraction("chunk", (9,))))
    assert "frame extraction: chunk, target_frames 17" in carried.summary()
    assert "frame extraction" not in plain.summary()
    # musubi's chunk of 17 cuts the same clips as the cachers' own chunks of 17
    spec = FrameSpec(17, "chunks", 24.0, latent_format=K5)
    assert [c.indices for c in plan_clips(carried, spec)[0]] == [c.indices for c in plan_clips(plain, spec)[0]]


def test_too_short_items_are_problems_and_nothing_left_is_an_error(folders):
    ds = scan_folder(folders.a, frame_extraction=FrameExtraction("head", (257,)))
    clips, problems = plan_clips(ds, FrameSpec(17, latent_format=K5))
    assert [c.item.kind for c in clips] == ["image"] and len(problems) == 1 and "needs 257 frames" in str(problems[0])
    videos = Dataset([item for item in ds.items if item.kind == "video"])
    with pytest.raises(DatasetError, match="its frame extraction asks for"):
        plan_clips(videos, FrameSpec(17, latent_format=K5))


def test_sound_follows_consecutive_clips_of_a_dataset_extraction(folders):
    uniform_spec = FrameSpec(9, "uniform", latent_format=LTX2)
    own = scan_folder(folders.a, frame_extraction=FrameExtraction("uniform", (9,), frame_sample=3))
    clips, _ = plan_clips(own, uniform_spec)
    check_clip_audio(clips, uniform_spec, "silence")  # every clip is consecutive frames: allowed
    mixed, _ = plan_clips(combine_datasets([own, scan_folder(folders.b)]), uniform_spec)
    with pytest.raises(ValueError, match="uniform"):
        check_clip_audio(mixed, uniform_spec, "silence")


def test_combined_ids_carry_the_folder_and_never_collide(folders):
    a = scan_folder(folders.a, repeats=3, trigger_word="ohwx")
    b = scan_folder(folders.b, trigger_word="sks", frame_extraction=FrameExtraction("full"))
    combined = combine_datasets([a, b])
    ids = [item.source_id for item in combined.items]
    assert ids == ["a/astronaut.png", "a/bbb.mp4", "b/astronaut.png", "b/bbb.mp4"]
    assert [i.repeats for i in combined.items] == [3, 3, 1, 1]
    assert [i.caption for i in combined.items] == ["ohwx, astronaut in a", "ohwx, bbb in a", "sks, astronaut in b",
                                                   "sks, bbb in b"]
    assert [i.extraction for i in combined.items] == [None, None, b.items[0].extraction, b.items[0].extraction]
    assert combined.trigger_word == "ohwx, sks" and combined.root is None
    # two folders named "a", and the same folder twice
    same_name = combine_datasets([a, scan_folder(folders.other_a), a])
    assert [i.source_id for i in same_name.items] == ["a#1/astronaut.png", "a#1/bbb.mp4", "a#2/coffee.png",
                                                      "a#3/astronaut.png", "a#3/bbb.mp4"]
    nested = combine_datasets([combined, from_tensors([torch.rand(2, 8, 8, 3)], "noise", names=["noise"])])
    assert len({i.source_id for i in nested.items}) == len(nested.items) == 5
    assert nested.items[0].source_id == "dataset#1/a/astronaut.png"
    assert dataset_fingerprint(combined) != dataset_fingerprint(combine_datasets([a, scan_folder(folders.b)]))


def test_combining_nothing_or_something_else_is_refused(folders):
    with pytest.raises(DatasetError, match="no datasets"):
        combine_datasets([])
    with pytest.raises(DatasetError, match="dataset 2 is a str"):
        combine_datasets([scan_folder(folders.a), "b"])


# ------------------------------------------------------------------------------------------ caching


class NotCalled:
    def encode(self, *args, **kwargs):
        raise AssertionError("nothing may be encoded")


class PoolingVAE:
    """Stands in for the K5 VAE (the cache mechanics are under test, not the VAE): latents of K5's shape, each value
    the mean of the pixels it covers."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        channels, frames, height, width = K5.latent_shape(video.shape[4], video.shape[3], video.shape[2])
        pooled = torch.nn.functional.adaptive_avg_pool3d(video, (frames, height, width))
        return pooled.repeat(1, -(-channels // 3), 1, 1, 1)[:, :channels]


def fake_text(caption: str, template: str) -> dict[str, torch.Tensor]:
    """Text entries of the default layout's shapes; the captions' embeddings do not matter here."""
    return {"text": torch.zeros(2, 8), "pooled": torch.zeros(4)}


def test_a_combined_dataset_caches_one_sample_per_clip(folders, tmp_path):
    spec = FrameSpec(17, "head", 24.0, latent_format=K5)
    settings = dict(vae_id="pooling", frame_spec=spec, base_resolution=64)
    vae = PoolingVAE()
    cache = tmp_path / "cache"
    b = scan_folder(folders.b)
    before = cache_latents(b, vae, cache, **settings)  # b alone, as before combining

    slide = FrameExtraction("slide", (9,), frame_stride=60)
    combined = combine_datasets([scan_folder(folders.a, repeats=2, frame_extraction=slide), b])
    cache_text(combined, fake_text, cache, encoder_id="text")
    report = cache_latents(combined, vae, cache, **settings)
    n = resampled_count(BBB_FRAMES, BBB_FPS, 24.0)
    slides = len(range(0, n - 9 + 1, 60))
    # a: its photo and the slides, newly encoded; b: photo and head clip, cached under the keys they had alone
    assert (report.written, report.skipped) == (1 + slides, 2)
    assert sorted(report.entries[-2:]) == sorted(before.entries)
    samples = load_cached_dataset(combined, cache, encoder_id="text", **settings)
    assert [(s.item_id, s.frames, s.repeats) for s in samples] == (
        [("a/astronaut.png", 1, 2)] + [("a/bbb.mp4", 9, 2)] * slides + [("b/astronaut.png", 1, 1), ("b/bbb.mp4", 17, 1)])
    assert read_latent(samples[1])["latent"].shape[1] == K5.latent_frames(9)
    manifest = json.loads((cache / "latents" / "manifest.json").read_text())
    extractions = [e.get("extraction") for e in manifest["entries"].values() if e["item"] == "a/bbb.mp4"]
    assert extractions == [slide.as_dict()] * slides


def test_a_count_the_family_cannot_encode_is_refused_before_anything_is_written(folders, tmp_path):
    ds = scan_folder(folders.a, frame_extraction=FrameExtraction("head", (13,)))
    with pytest.raises(ValueError, match="13 → 9 or 17"):
        cache_latents(ds, NotCalled(), tmp_path / "cache", vae_id="x", frame_spec=FrameSpec(9, latent_format=LTX2))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
