"""Training data: folder scanning and captions, fps resampling and clip selection, buckets, clip loading."""

from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cinetune.core.family import LatentFormat
from cinetune.core.media import MediaError, read_video, write_video
from cinetune.k5.family import K5_LATENT_FORMAT
from cinetune.ltx2.family import LTX2_LATENT_FORMAT
from cinetune.training.data import (
    DATASET_ROOTS_ENV,
    Bucket,
    Dataset,
    DatasetError,
    DatasetLocationError,
    FrameSpec,
    NoAudioError,
    NoBucketError,
    TooShortError,
    assign_bucket,
    check_clip_audio,
    clip_audio_span,
    clip_fps,
    dataset_fingerprint,
    dataset_roots,
    frame_indices,
    from_tensors,
    load_clip,
    load_clip_audio,
    make_buckets,
    plan_clips,
    resolve_dataset_folder,
    scan_folder,
)

BBB_FRAMES, BBB_FPS = 132, 25.0
K5 = K5_LATENT_FORMAT
# LTX-2's video latent geometry (reference ltx2.md §4, §6): 8k+1 frames, sizes multiples of 32 px, 24 fps
LTX2_SHAPED = LatentFormat(name="ltx-2-shaped", channels=128, spatial_factor=32, temporal_factor=8, size_multiple=32,
                           default_fps=24.0)


@pytest.fixture(scope="module")
def tiny_gif() -> Path:
    """scikit-image's real animated GIF: 14x25 px, 24 frames at 100/7 fps."""
    return Path(str(importlib.metadata.distribution("scikit-image").locate_file(
        "skimage/data/no_time_for_that_tiny.gif")))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, test_data, tiny_gif) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    (root / "sub").mkdir()
    os.symlink(test_data["bbb"], root / "bbb.mp4")
    (root / "bbb.txt").write_text("a big rabbit\nin a meadow\n")
    shutil.copy(test_data["astronaut"], root / "astronaut.png")
    (root / "astronaut.txt").write_text("ohwx astronaut in a white suit")  # already starts with the trigger
    shutil.copy(test_data["chelsea"], root / "sub" / "chelsea.png")
    (root / "sub" / "chelsea.txt").write_text("\ufeffa ginger cat\n", encoding="utf-8")  # with a BOM
    shutil.copy(test_data["coffee"], root / "coffee.png")  # no caption
    (root / "broken.mp4").write_bytes(test_data["bbb"].read_bytes()[:10_000])
    (root / "broken.txt").write_text("a broken clip")
    shutil.copy(tiny_gif, root / "tiny.gif")
    (root / "tiny.txt").write_text("a tiny animation")
    (root / "._bbb.mp4").write_bytes(b"\x00" * 100)  # macOS resource fork: ignored
    (root / "notes.md").write_text("not media")
    return root


@pytest.fixture(scope="module")
def mixed(mixed_folder) -> Dataset:
    return scan_folder(mixed_folder, repeats=3, trigger_word="ohwx")


# ------------------------------------------------------------------------------------------- scanning


def test_scan_finds_items_with_metadata(mixed, mixed_folder):
    by_id = {item.source_id: item for item in mixed.items}
    assert [item.source_id for item in mixed.items] == ["astronaut.png", "bbb.mp4", "sub/chelsea.png", "tiny.gif"]
    bbb, gif = by_id["bbb.mp4"], by_id["tiny.gif"]
    assert (bbb.kind, bbb.width, bbb.height, bbb.frames, bbb.fps) == ("video", 1280, 720, BBB_FRAMES, BBB_FPS)
    assert (gif.kind, gif.width, gif.height, gif.frames) == ("video", 14, 25, 24)
    assert gif.fps == pytest.approx(100 / 7)
    for name, size in [("astronaut.png", (512, 512)), ("sub/chelsea.png", (451, 300))]:
        item = by_id[name]
        assert (item.kind, item.width, item.height, item.frames, item.fps) == ("image", *size, 1, None)
        assert item.path == mixed_folder / name
    assert all(item.repeats == 3 for item in mixed.items)


def test_captions_trigger_word_and_line_joining(mixed):
    captions = {item.source_id: item.caption for item in mixed.items}
    assert captions == {
        "bbb.mp4": "ohwx, a big rabbit in a meadow",
        "astronaut.png": "ohwx astronaut in a white suit",
        "sub/chelsea.png": "ohwx, a ginger cat",
        "tiny.gif": "ohwx, a tiny animation",
    }


def test_problems_name_the_files_and_the_fix(mixed, mixed_folder):
    problems = {p.path.name: str(p) for p in mixed.problems}
    assert set(problems) == {"coffee.png", "broken.mp4"}
    assert "coffee.txt is missing" in problems["coffee.png"] and "default caption" in problems["coffee.png"]
    assert str(mixed_folder / "broken.mp4") in problems["broken.mp4"]
    assert "cannot be read" in problems["broken.mp4"] and "re-encode" in problems["broken.mp4"]
    assert "2 problems" in mixed.summary() and "coffee.png" in mixed.summary()


def test_truncated_file_that_still_opens_is_a_problem(tmp_path):
    t = torch.linspace(0, 1, 24).view(-1, 1, 1, 1)
    video = (t + torch.linspace(0, 1, 64).view(1, 1, -1, 1)).remainder(1.0).expand(24, 48, 64, 3).contiguous()
    data = write_video(video, tmp_path / "full.mp4", fps=24).read_bytes()  # index at the front (faststart)
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    (tmp_path / "cut.txt").write_text("cut")
    (tmp_path / "full.txt").write_text("full")
    ds = scan_folder(tmp_path)
    assert [item.source_id for item in ds.items] == ["full.mp4"]
    assert ds.problems[0].path.name == "cut.mp4" and "truncated" in ds.problems[0].message
    # header-only scanning accepts it; decoding then fails with the file named
    cut = next(item for item in scan_folder(tmp_path, verify=False).items if item.source_id == "cut.mp4")
    with pytest.raises(MediaError, match="cut.mp4"):
        load_clip(cut, list(range(cut.frames)), Bucket(64, 48))


def test_missing_caption_options(tmp_path, test_data):
    shutil.copy(test_data["rocket"], tmp_path / "rocket.jpg")
    (tmp_path / "rocket.txt").write_text("a rocket")
    shutil.copy(test_data["coffee"], tmp_path / "coffee.png")
    (tmp_path / "empty.txt").write_text("  \n")
    shutil.copy(test_data["chelsea"], tmp_path / "empty.png")
    with_default = scan_folder(tmp_path, default_caption="a photo", trigger_word="sks")
    assert {i.source_id: i.caption for i in with_default.items} == {
        "coffee.png": "sks, a photo", "empty.png": "sks, a photo", "rocket.jpg": "sks, a rocket"}
    assert with_default.problems == []
    strict = scan_folder(tmp_path)
    assert sorted(p.path.name for p in strict.problems) == ["coffee.png", "empty.png"]
    assert "empty.txt is empty" in str(strict.problems[1])
    skipped = scan_folder(tmp_path, skip_missing_captions=True)
    assert [i.source_id for i in skipped.items] == ["rocket.jpg"] and skipped.problems == []
    assert [i.source_id for i in scan_folder(tmp_path, recursive=False).items] == ["rocket.jpg"]


def test_captions_in_another_encoding_are_problems_not_training_text(tmp_path, test_data):
    """UTF-16 without a byte-order mark decodes as UTF-8 text full of NULs; other control characters likewise are
    reported with the file, the character and the fix. A tab is kept."""
    for name, data in (("utf16", "portrait of an astronaut".encode("utf-16-le")), ("bell", b"a rocket\x07 launch"),
                       ("tab", b"a rocket\tat dawn"), ("latin", "caf\u00e9".encode("latin-1"))):
        shutil.copy(test_data["rocket"], tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.txt").write_bytes(data)
    result = scan_folder(tmp_path)
    assert [i.caption for i in result.items] == ["a rocket\tat dawn"]
    problems = {p.path.name: str(p) for p in result.problems}
    assert "control character '\\x00' at position 1; if it was saved as UTF-16, save it as UTF-8" in problems["utf16.txt"]
    assert "control character '\\x07' at position 8" in problems["bell.txt"]
    assert "is not UTF-8 text" in problems["latin.txt"]


def test_empty_and_unusable_folders_raise(tmp_path, test_data):
    (tmp_path / "caption_only.txt").write_text("lonely caption")
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and ".mp4" in message and ".gif" in message and ".png" in message
    shutil.copy(test_data["coffee"], tmp_path / "coffee.png")
    with pytest.raises(DatasetError, match=r"no usable training files(.|\n)*coffee.png"):
        scan_folder(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        scan_folder(tmp_path / "missing")


def test_scan_stops_after_max_problems_and_counts_the_rest(tmp_path, test_data, monkeypatch):
    import cinetune.training.data as data

    for i in range(12):  # 12 photos without captions, then 3 captioned ones
        shutil.copy(test_data["coffee"], tmp_path / f"a{i:02d}.png")
    for i in range(3):
        shutil.copy(test_data["coffee"], tmp_path / f"b{i}.png")
        (tmp_path / f"b{i}.txt").write_text("a cup")
    opened = []
    real = data._image_size
    monkeypatch.setattr(data, "_image_size", lambda path, verify: opened.append(path.name) or real(path, verify))
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path, max_problems=5)
    message = str(info.value)
    assert "after 5 problems" in message and "10 more media files were not checked (7 of them have no .txt" in message
    assert message.count(".png: caption file") == 5 and "a04.png" in message and "a05.png" not in message
    assert opened == []  # nothing was decoded: the five problems are missing captions
    with pytest.raises(DatasetError, match="after 12 problems; 3 more"):  # the 12th problem comes with files left
        scan_folder(tmp_path, max_problems=12)
    assert len(scan_folder(tmp_path, max_problems=13).problems) == 12
    assert len(scan_folder(tmp_path, max_problems=None).problems) == 12
    with pytest.raises(ValueError, match="max_problems"):
        scan_folder(tmp_path, max_problems=0)


def test_scan_stops_at_the_default_bound(tmp_path):
    for i in range(60):
        (tmp_path / f"clip{i:02d}.mp4").write_bytes(b"not a video")
        (tmp_path / f"clip{i:02d}.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"after 50 problems; 10 more media files were not checked \(0 of them"):
        scan_folder(tmp_path)


@pytest.fixture
def places(tmp_path):
    """An input folder with a dataset, a dataset root with one, and a folder outside both."""
    for name in ("input/mine", "roots/one/shared", "elsewhere/secret", "input/other"):
        (tmp_path / name).mkdir(parents=True)
    return tmp_path


def test_relative_dataset_folders_stay_inside_the_input_folder(places):
    inp = places / "input"
    assert resolve_dataset_folder(" mine ", input_dir=inp, roots=[]) == inp / "mine"
    assert resolve_dataset_folder("other/../mine", input_dir=inp, roots=[]) == inp / "mine"
    for escaping in ("..", "../elsewhere/secret", "mine/../../elsewhere"):
        with pytest.raises(DatasetLocationError, match="leaves ComfyUI's input folder"):
            resolve_dataset_folder(escaping, input_dir=inp, roots=[places / "roots"])
    with pytest.raises(DatasetError, match="not found"):
        resolve_dataset_folder("missing", input_dir=inp, roots=[])
    for bad in ("", "   ", "mine\x00", "mi\nne"):
        with pytest.raises(DatasetLocationError):
            resolve_dataset_folder(bad, input_dir=inp, roots=[])


def test_absolute_dataset_folders_only_under_the_input_folder_or_a_root(places):
    inp, root = places / "input", places / "roots" / "one"
    assert resolve_dataset_folder(str(inp / "mine"), input_dir=inp, roots=[]) == inp / "mine"
    assert resolve_dataset_folder(str(root / "shared"), input_dir=inp, roots=[root]) == root / "shared"
    assert resolve_dataset_folder(str(root), input_dir=inp, roots=[root]) == root
    for outside in ("/", str(places / "elsewhere" / "secret"), str(root / ".." / ".." / "elsewhere"),
                    str(places / "roots")):
        with pytest.raises(DatasetLocationError) as info:
            resolve_dataset_folder(outside, input_dir=inp, roots=[root])
        assert DATASET_ROOTS_ENV in str(info.value) and str(root) in str(info.value)
    with pytest.raises(DatasetLocationError, match="dataset roots \\(none\\)"):
        resolve_dataset_folder(str(root), input_dir=inp, roots=[])


def test_a_link_placed_in_a_root_is_followed(places):
    inp = places / "input"
    os.symlink(places / "elsewhere" / "secret", inp / "linked")
    assert resolve_dataset_folder("linked", input_dir=inp, roots=[]) == inp / "linked"


def test_dataset_roots_come_from_the_environment(places, monkeypatch):
    inp, root = places / "input", places / "roots" / "one"
    monkeypatch.setenv(DATASET_ROOTS_ENV, f"{os.pathsep}{root}{os.pathsep} {places / 'roots'} ")
    assert dataset_roots() == [root, places / "roots"]
    assert resolve_dataset_folder(str(root / "shared"), input_dir=inp) == root / "shared"
    monkeypatch.setenv(DATASET_ROOTS_ENV, "relative/folder")
    with pytest.raises(DatasetLocationError, match=f"{DATASET_ROOTS_ENV} lists 'relative/folder'"):
        resolve_dataset_folder(str(root / "shared"), input_dir=inp)
    monkeypatch.delenv(DATASET_ROOTS_ENV)
    assert dataset_roots() == []
    with pytest.raises(DatasetLocationError):
        resolve_dataset_folder(str(root / "shared"), input_dir=inp)
    assert dataset_roots({DATASET_ROOTS_ENV: str(root)}) == [root]


# ------------------------------------------------------------------------------------------- frames


def nearest_source_frame(i: int, src: Fraction, dst: Fraction) -> int:
    """Brute force: the source frame whose timestamp k/src is nearest to i/dst (the later one on ties)."""
    t = Fraction(i) / dst
    return min(range(BBB_FRAMES), key=lambda k: (abs(Fraction(k) / src - t), -k))


def test_bbb_25_to_24_fps_resampling():
    (clip,) = frame_indices(BBB_FRAMES, BBB_FPS, FrameSpec(125, "head", latent_format=K5))
    # 125/24 s of a 5.28 s video; hand-computed: t = i/24, frame = round(25 t), ties up
    assert clip[0] == 0 and clip[1] == 1 and clip[11] == 11 and clip[12] == 13  # 12.5 → 13: the first skip
    assert clip[23] == 24 and clip[24] == 25 and clip[124] == 129  # 129.17
    assert clip == [nearest_source_frame(i, Fraction(25), Fraction(24)) for i in range(125)]
    assert len(set(clip)) == 125  # downsampling never repeats a frame


def test_resampling_identity_and_upsampling(tiny_gif):
    assert frame_indices(50, 24.0, FrameSpec(49, latent_format=K5))[0] == list(range(49))
    assert frame_indices(50, 30.0, FrameSpec(49, target_fps=None, latent_format=K5))[0] == list(range(49))
    assert frame_indices(50, None, FrameSpec(49, latent_format=K5))[0] == list(range(49))
    # the GIF: 24 frames at 100/7 fps (1.68 s) → 40 frames at 24 fps, each source frame used 1-2 times
    with pytest.raises(TooShortError) as info:
        frame_indices(24, 100 / 7, FrameSpec(41, latent_format=K5))
    assert info.value.available == 40 and info.value.largest_valid == 37
    (clip,) = frame_indices(24, 100 / 7, FrameSpec(37, latent_format=K5))
    assert clip == sorted(clip) and clip[:5] == [0, 1, 1, 2, 2]
    assert set(clip) == set(range(22))  # the last target time, 36/24 s, is nearest to source frame 21.4


def test_selection_modes_counts_and_bounds():
    (head,) = frame_indices(BBB_FRAMES, BBB_FPS, FrameSpec(17, "head", latent_format=K5))
    assert head == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17]
    (uniform,) = frame_indices(BBB_FRAMES, BBB_FPS, FrameSpec(17, "uniform", latent_format=K5))
    assert len(uniform) == 17 and uniform[0] == 0 and uniform[-1] == BBB_FRAMES - 1
    assert all(b > a for a, b in zip(uniform, uniform[1:]))
    steps = np.diff(uniform)
    assert steps.min() >= 7 and steps.max() <= 9  # evenly spread: 131/16 ≈ 8.2 source frames apart
    chunks = frame_indices(BBB_FRAMES, BBB_FPS, FrameSpec(17, "chunks", latent_format=K5))
    assert len(chunks) == 7  # 127 resampled frames // 17
    flat = [i for clip in chunks for i in clip]
    assert flat == sorted(flat) and len(set(flat)) == 7 * 17 and max(flat) < BBB_FRAMES
    assert chunks[0] == head
    sliding = frame_indices(BBB_FRAMES, BBB_FPS, FrameSpec(17, "chunks", chunk_stride=8, latent_format=K5))
    assert len(sliding) == 14 and all(len(c) == 17 for c in sliding)  # starts 0, 8, ..., 104 (≤ 127 − 17)
    assert sliding[1][:9] == chunks[0][8:]  # overlap of 9 resampled frames


def test_too_short_names_available_and_largest_valid():
    with pytest.raises(TooShortError) as info:
        frame_indices(BBB_FRAMES, BBB_FPS, FrameSpec(241, latent_format=K5))
    message = str(info.value)
    assert "241" in message and "only 127" in message and "≤ 125" in message and "5.28 s" in message
    assert (info.value.needed, info.value.available, info.value.largest_valid) == (241, 127, 125)


def test_frame_spec_validation():
    with pytest.raises(ValueError, match="use 13 or 17"):
        FrameSpec(16, latent_format=K5)
    with pytest.raises(ValueError, match="chunk_stride only applies"):
        FrameSpec(17, "head", chunk_stride=4, latent_format=K5)
    with pytest.raises(ValueError, match="mode"):
        FrameSpec(17, "random", latent_format=K5)


def test_frame_spec_follows_the_latent_format():
    assert FrameSpec(17, latent_format=K5).target_fps == 24.0  # the format's default fps, stored resolved
    assert FrameSpec(17, target_fps=25.0, latent_format=K5) == FrameSpec(17, "head", 25.0, latent_format=K5)
    ltx = FrameSpec(121, latent_format=LTX2_SHAPED)
    assert ltx.target_fps == 24.0
    with pytest.raises(ValueError, match=r"must be 8k\+1 \(the VAE packs 8 frames per latent after the first\); "
                                         r"16 is not: use 9 or 17"):
        FrameSpec(16, latent_format=LTX2_SHAPED)
    with pytest.raises(ValueError, match="use 17 or 25"):
        FrameSpec(21, latent_format=LTX2_SHAPED)  # valid for K5, not for an 8× temporal VAE
    with pytest.raises(TypeError, match="LatentFormat"):
        FrameSpec(17, latent_format=None)
    with pytest.raises(ValueError, match="'format'"):
        FrameSpec(17, target_fps="source", latent_format=K5)
    # the longest clip a short video gives follows the format's frame rule: 40 frames at 24 fps → 33 (8k+1)
    with pytest.raises(TooShortError) as info:
        frame_indices(24, 100 / 7, FrameSpec(41, latent_format=LTX2_SHAPED))
    assert info.value.largest_valid == 33 and "≤ 33" in str(info.value)


def test_plan_clips_reports_short_videos(mixed):
    clips, problems = plan_clips(mixed, FrameSpec(49, latent_format=K5))
    assert [c.item.source_id for c in clips] == ["astronaut.png", "bbb.mp4", "sub/chelsea.png"]
    assert clips[0].indices == [0] and len(clips[1].indices) == 49
    assert len(problems) == 1 and problems[0].path.name == "tiny.gif" and "≤ 37" in str(problems[0])
    with pytest.raises(DatasetError, match="tiny.gif"):
        plan_clips(Dataset([c.item for c in clips if c.item.kind == "video"] + [mixed.items[-1]]),
                   FrameSpec(241, latent_format=K5))


# ------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("base, step", [(512, 16), (512, 128), (768, 16), (1024, 128), ((960, 544), 16)])
def test_buckets_are_step_multiples_with_equal_area(base, step):
    buckets = make_buckets(base, K5, step=step)
    area = base * base if isinstance(base, int) else base[0] * base[1]
    assert len(buckets) >= 5
    for b in buckets:
        assert b.width % step == 0 and b.height % step == 0
        assert abs(b.area / area - 1) <= step / min(b.width, b.height)
        assert Bucket(b.height, b.width) in buckets  # portrait twin
        assert max(b.aspect, 1 / b.aspect) <= 4.0
    assert len({b.aspect for b in buckets}) == len(buckets)
    side = int(math.sqrt(area)) // step * step
    assert Bucket(side, side) in buckets or Bucket(side + step, side + step) in buckets
    if not isinstance(base, int):
        assert Bucket(*base) in buckets


def test_bucket_step_comes_from_the_latent_format():
    ltx = make_buckets(512, LTX2_SHAPED)
    assert all(b.width % 32 == 0 and b.height % 32 == 0 for b in ltx)
    assert ltx != make_buckets(512, K5) and ltx == make_buckets(512, K5, step=32)  # same grid, same buckets
    assert make_buckets(512, LTX2_SHAPED, step=64) == make_buckets(512, K5, step=64)
    with pytest.raises(ValueError, match="bucket step 48 px is not a multiple of 32 px.*'ltx-2-shaped'"):
        make_buckets(512, LTX2_SHAPED, step=48)
    with pytest.raises(ValueError, match="not a multiple of 16 px"):
        make_buckets(512, K5, step=24)
    with pytest.raises(TypeError, match="LatentFormat"):
        make_buckets(512, 16)


def test_assign_bucket_nearest_aspect_without_upscaling():
    buckets = make_buckets(512, K5)
    assert assign_bucket(1920, 1080, buckets) == Bucket(688, 384)  # 1.79 vs 16:9 = 1.78
    assert assign_bucket(1080, 1920, buckets) == Bucket(384, 688)
    assert assign_bucket(2000, 2000, buckets) == Bucket(512, 512)
    # the cat photo (451x300) is smaller than its 624x416 bucket: the largest 3:2 bucket inside it instead
    assert assign_bucket(451, 300, buckets) == Bucket(432, 288)
    assert assign_bucket(451, 300, buckets, allow_upscale=True) == Bucket(624, 416)
    # NABLA grid: the fallback keeps sides multiples of 128
    assert assign_bucket(300, 300, make_buckets(512, K5, step=128)) == Bucket(256, 256)


def test_tiny_item_needs_upscaling(tiny_gif):
    buckets = make_buckets(512, K5)
    with pytest.raises(NoBucketError) as info:
        assign_bucket(14, 25, buckets, name=tiny_gif.name)
    message = str(info.value)
    assert "no_time_for_that_tiny.gif (14x25)" in message and "16 px" in message
    smallest = min(buckets, key=lambda b: b.area)
    assert f"smallest bucket is {smallest}" in message and "384x688" in message and "allow upscaling" in message
    assert assign_bucket(14, 25, buckets, allow_upscale=True) == Bucket(384, 688)  # 0.558 vs 0.56


# ------------------------------------------------------------------------------------------- loading


def pil_fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC), dtype=np.float32)


def test_load_bbb_head_clip(mixed, test_data):
    bbb = next(item for item in mixed.items if item.source_id == "bbb.mp4")
    bucket = assign_bucket(bbb.width, bbb.height, make_buckets((256, 144), K5))
    assert bucket == Bucket(256, 144)
    (indices,) = frame_indices(bbb.frames, bbb.fps, FrameSpec(17, "head", latent_format=K5))
    clip = load_clip(bbb, indices, bucket)
    assert clip.shape == (3, 17, 144, 256) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1 and clip.min() < -0.9 and clip.max() > 0.9
    frames, _ = read_video(test_data["bbb"], max_frames=18)
    ours = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).numpy()  # [F, H, W, 3] in 0..255
    for pos in (0, 12, 16):  # position 12 holds source frame 13 (the 25 → 24 fps skip)
        ref = pil_fit(frames[indices[pos]].numpy(), 256, 144)
        assert np.abs(ours[pos].mean((0, 1)) - ref.mean((0, 1))).max() < 1.0
        assert np.abs(ours[pos] - ref).mean() < 1.5
    skipped = pil_fit(frames[12].numpy(), 256, 144)
    assert np.abs(ours[12] - skipped).mean() > 2 * np.abs(ours[12] - pil_fit(frames[13].numpy(), 256, 144)).mean()


def test_load_photo_and_gif(mixed, test_data):
    by_id = {item.source_id: item for item in mixed.items}
    cat = by_id["sub/chelsea.png"]
    photo = load_clip(cat, [0], Bucket(432, 288))
    assert photo.shape == (3, 1, 288, 432)
    # 451x300 → centre 450x300 → 432x288
    ref = pil_fit(np.asarray(Image.open(test_data["chelsea"]).convert("RGB"))[:, :450], 432, 288)
    assert np.abs(((photo[:, 0].permute(1, 2, 0) + 1) * 127.5).numpy() - ref).mean() < 1.5
    with pytest.raises(ValueError, match="indices \\[0\\]"):
        load_clip(cat, [0, 0], Bucket(432, 288))
    gif = by_id["tiny.gif"]
    (indices,) = frame_indices(gif.frames, gif.fps, FrameSpec(9, latent_format=K5))
    clip = load_clip(gif, indices, Bucket(64, 112))  # upscaled
    assert clip.shape == (3, 9, 112, 64)
    assert torch.equal(clip[:, 1], clip[:, 2]) and indices[1] == indices[2] == 1  # a repeated source frame


def test_from_tensors_centre_crop_and_identity():
    wide = torch.zeros(100, 200, 3)
    wide[..., 2] = 1.0
    wide[:, :50, 0], wide[:, :50, 2] = 1.0, 0.0  # left quarter red, outside the centre square
    video = torch.rand(5, 32, 48, 3)
    ds = from_tensors([wide, video, torch.zeros(4, 4)], ["wide", "noise"] + ["bad"], trigger_word="sks", fps=24.0)
    assert [(i.kind, i.width, i.height, i.frames, i.fps) for i in ds.items] == [
        ("image", 200, 100, 1, None), ("video", 48, 32, 5, 24.0)]
    assert ds.items[0].caption == "sks, wide" and ds.items[0].path is None
    assert len(ds.problems) == 1 and "tensor-2" in str(ds.problems[0])
    square = load_clip(ds.items[0], [0], Bucket(64, 64))
    assert square.shape == (3, 1, 64, 64)
    assert torch.allclose(square[:, 0].mean((1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=1e-4)
    same = load_clip(ds.items[1], [0, 4], Bucket(48, 32))  # no resize: exact values
    assert torch.allclose(same, video[[0, 4]].permute(3, 0, 1, 2) * 2 - 1, atol=1e-5)
    changed = from_tensors([wide.clone().fill_(0.5)], "wide")
    assert changed.items[0].source_id != from_tensors([wide], "wide").items[0].source_id


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_captions_only(tmp_path, test_data):
    shutil.copy(test_data["rocket"], tmp_path / "rocket.jpg")
    shutil.copy(test_data["coffee"], tmp_path / "coffee.png")
    (tmp_path / "rocket.txt").write_text("a rocket")
    (tmp_path / "coffee.txt").write_text("a cup of coffee")
    first = dataset_fingerprint(scan_folder(tmp_path))
    again = scan_folder(tmp_path)
    assert dataset_fingerprint(again) == first and len(first) == 64
    assert dataset_fingerprint(list(reversed(again.items))) == first  # order does not matter
    (tmp_path / "coffee.txt").write_text("a cup of tea")
    changed = dataset_fingerprint(scan_folder(tmp_path))
    assert changed != first
    (tmp_path / "coffee.txt").write_text("a cup of coffee")
    assert dataset_fingerprint(scan_folder(tmp_path)) == first
    assert dataset_fingerprint(scan_folder(tmp_path, trigger_word="sks")) != first
    assert dataset_fingerprint(scan_folder(tmp_path, repeats=2)) != first


# ------------------------------------------------------------------------------------------- sound (LTX-2)


def test_scan_records_which_items_have_sound(mixed):
    by_id = {item.source_id: item for item in mixed.items}
    assert by_id["bbb.mp4"].has_audio is True  # 5.1 AAC
    assert by_id["tiny.gif"].has_audio is False and by_id["astronaut.png"].has_audio is False
    assert from_tensors([torch.rand(2, 8, 8, 3)], "x").items[0].has_audio is False
    assert "(2 videos, 1 with sound, 2 images)" in mixed.summary()


def itu_stereo_16k(path: Path) -> np.ndarray:
    """Independent reference: the whole 5.1 track decoded with PyAV, downmixed by ITU-R BS.775 (front 1, centre and
    surround 1/√2, LFE 0, each side normalised by the sum of its weights) and resampled 48 → 16 kHz by scipy."""
    from scipy.signal import resample_poly

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        names = [c.name for c in stream.layout.channels]
        assert names == ["FL", "FR", "FC", "LFE", "BL", "BR"] and stream.codec_context.sample_rate == 48000
        pcm = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1).astype(np.float64)
    c = 1 / math.sqrt(2)
    left = np.array([1, 0, c, 0, c, 0]) / (1 + 2 * c)
    right = np.array([0, 1, c, 0, 0, c]) / (1 + 2 * c)
    return resample_poly(np.stack([left @ pcm, right @ pcm]), 1, 3, axis=1)


def test_bbb_sound_is_read_per_clip(mixed, test_data):
    bbb = next(item for item in mixed.items if item.source_id == "bbb.mp4")
    spec = FrameSpec(17, "chunks", target_fps=None, latent_format=LTX2_LATENT_FORMAT)  # keep BBB's 25 fps
    clips = frame_indices(bbb.frames, bbb.fps, spec)
    indices = clips[2]  # frames 34..50
    start, duration = clip_audio_span(bbb, indices, spec)
    assert (start, duration) == (34 / 25, 17 / 25) and clip_fps(bbb, spec) == 25.0
    wave = load_clip_audio(bbb, indices, spec)
    assert wave.dtype == torch.float32 and wave.shape == (2, round(17 / 25 * 16000))  # stereo, 16 kHz, 0.68 s
    ref = itu_stereo_16k(test_data["bbb"])[:, round(start * 16000):][:, :wave.shape[1]]
    ours = wave.double().numpy()
    for ch in range(2):
        assert np.corrcoef(ours[ch], ref[ch])[0, 1] > 0.99
        assert abs(np.sqrt((ours[ch] ** 2).mean() / (ref[ch] ** 2).mean()) - 1) < 0.02
    assert not np.allclose(ours[0], ours[1])  # the surround channels keep left and right apart
    # at 24 fps the same 17 frames last 17/24 s: the track follows the clip's duration
    resampled = FrameSpec(17, "head", latent_format=LTX2_LATENT_FORMAT)
    (head,) = frame_indices(bbb.frames, bbb.fps, resampled)
    assert load_clip_audio(bbb, head, resampled).shape == (2, round(17 / 24 * 16000))


def test_frame_rate_is_kept_per_clip():
    spec_keep = FrameSpec(9, target_fps=None, latent_format=LTX2_LATENT_FORMAT)
    video = from_tensors([torch.rand(9, 8, 8, 3)], "x", fps=30.0).items[0]
    image = from_tensors([torch.rand(1, 8, 8, 3)], "x").items[0]
    unknown = from_tensors([torch.rand(9, 8, 8, 3)], "x").items[0]
    assert clip_fps(video, spec_keep) == 30.0
    assert clip_fps(image, spec_keep) == clip_fps(unknown, spec_keep) == 24.0  # the LTX-2 default
    assert clip_fps(video, FrameSpec(9, target_fps=25.0, latent_format=LTX2_LATENT_FORMAT)) == 25.0
    assert clip_audio_span(image, [0], spec_keep) == (0.0, 1 / 24)


def test_ltx2_buckets_and_frames_come_from_its_latent_format(mixed):
    buckets = make_buckets(512, LTX2_LATENT_FORMAT)
    assert all(b.width % 32 == 0 and b.height % 32 == 0 for b in buckets) and Bucket(512, 512) in buckets
    with pytest.raises(ValueError, match=r"8k\+1.*16 is not: use 9 or 17"):
        FrameSpec(16, latent_format=LTX2_LATENT_FORMAT)
    # BBB has 132 frames at 25 fps: a 137-frame clip fits no 8k+1 bucket; the problem names the file and 129
    clips, problems = plan_clips(mixed, FrameSpec(137, target_fps=None, latent_format=LTX2_LATENT_FORMAT))
    bbb = next(p for p in problems if p.path.name == "bbb.mp4")
    assert "needs 137 frames but only 132" in bbb.message and "target_frames ≤ 129" in bbb.message
    assert [c.item.kind for c in clips] == ["image", "image"]


def test_sound_checks_name_the_clips_without_sound(mixed):
    spec = FrameSpec(17, latent_format=LTX2_LATENT_FORMAT)
    clips, _ = plan_clips(mixed, spec)
    with pytest.raises(NoAudioError) as err:
        check_clip_audio(clips, spec)
    assert sorted(Path(f).name for f in err.value.files) == ["astronaut.png", "chelsea.png", "tiny.gif"]
    assert "3 training items have no audio track" in str(err.value) and "'silence'" in str(err.value)
    check_clip_audio(clips, spec, "silence")
    with pytest.raises(ValueError, match="'uniform'"):
        check_clip_audio(clips, FrameSpec(17, "uniform", latent_format=LTX2_LATENT_FORMAT), "silence")
    with pytest.raises(ValueError, match="missing audio must be one of 'error', 'silence'"):
        check_clip_audio(clips, spec, "drop")
    with pytest.raises(ValueError, match="'kandinsky-5' has no audio latents"):
        check_clip_audio(clips, FrameSpec(17, latent_format=K5), "silence")
    gif = next(c for c in clips if c.item.source_id == "tiny.gif")
    with pytest.raises(NoAudioError, match="no_time_for_that_tiny.gif|tiny.gif has no audio track"):
        load_clip_audio(gif.item, gif.indices, spec)
    silence = load_clip_audio(gif.item, gif.indices, spec, missing="silence")
    assert silence.shape == (2, round(17 / 24 * 16000)) and not silence.any()
