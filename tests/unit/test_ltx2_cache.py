"""LTX-2 training caches on the tiny LTX-2 checkpoint and the tiny Gemma 3 (real tokenizer): text entries of
projected Gemma features + mask, video and sound latents of real clips (Big Buck Bunny's 5.1 AAC track), keys that
follow the model, refusal of other families' caches, clips without sound, corrupt sound, interruption, repair, and
samples that the LTX-2 training adapter takes."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.media import write_video
from cinetune.k5.family import K5_LATENT_FORMAT
from cinetune.ltx2.config import LTX2TransformerConfig, tiny_transformer_metadata
from cinetune.ltx2.dit import LTX2DiT
from cinetune.ltx2.family import LTX2_FAMILY, LTX2_LATENT_FORMAT
from cinetune.ltx2.loader import load_ltx2_text_encoder, load_ltx2_vae
from cinetune.ltx2.text import MAX_LENGTH, encode_prompts, write_tiny_gemma
from cinetune.ltx2.tiny import write_tiny_checkpoint
from cinetune.ltx2.train import LTX2Sample, LTX2TrainingAdapter, ltx2_train_config
from cinetune.training.cache import (
    CacheError,
    CacheLayout,
    cache_latents,
    cache_text,
    load_cached_dataset,
    padded_text_entries,
    read_latent,
    weights_identity,
)
from cinetune.training.data import (
    Bucket,
    FrameExtraction,
    FrameSpec,
    NoAudioError,
    load_clip,
    load_clip_audio,
    scan_folder,
)
from cinetune.training.samples import (
    LTX2_CACHE_LAYOUT,
    ltx2_empty_text_from_cache,
    ltx2_samples_from_cache,
    samples_from_cache,
)
from cinetune.training.trainer import train_lora

FMT = LTX2_LATENT_FORMAT
SPEC = FrameSpec(17, "head", target_fps=None, latent_format=FMT)  # each clip keeps its own rate (BBB: 25 fps)
SETTINGS = dict(frame_spec=SPEC, base_resolution=(96, 64))
CAPTIONS = {"bbb.mp4": "a big rabbit wakes up", "astronaut.png": "an astronaut"}


class Stop(Exception):
    pass


def stop_after(entries: int):
    calls = itertools.count(1)

    def check():
        if next(calls) > entries:
            raise Stop

    return check


class CountingEntry:
    """Wraps a text-entry function and records the captions it encodes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, caption, template):
        self.calls.append(caption)
        return self.inner(caption, template)


class CountingVAE:
    """Wraps a VAE and records the shape of each video it encodes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def encode(self, video):
        self.calls.append(tuple(video.shape))
        return self.inner.encode(video)


pytestmark = pytest.mark.usefixtures("one_thread")


def load_models(ckpt: Path, gemma: Path, dtype=torch.float32) -> SimpleNamespace:
    encoder = load_ltx2_text_encoder(gemma, ckpt, dtype=dtype)
    vaes = load_ltx2_vae(ckpt, ckpt, dtype=dtype, tiling=False)
    # the ids the LTX-2 cache nodes build: the loaded weights (Gemma + projection; video + audio VAE)
    return SimpleNamespace(encoder=encoder, vaes=vaes, entry=padded_text_entries(lambda p: encode_prompts(encoder, p)),
                           text_id=weights_identity(encoder.gemma, encoder.projection, f"tokens={encoder.max_length}"),
                           vae_id=weights_identity(vaes.video.model, "tiling=False", vaes.audio))


@pytest.fixture(scope="module")
def files(tmp_path_factory, test_data):
    root = tmp_path_factory.mktemp("ltx2_models")
    return SimpleNamespace(root=root, ckpt=write_tiny_checkpoint(root / "ltx-2-19b-dev.safetensors", seed=0),
                           gemma=write_tiny_gemma(root / "gemma-3", test_data["gemma3_tokenizer"], seed=0))


@pytest.fixture(scope="module")
def models(files):
    return load_models(files.ckpt, files.gemma)


def make_folder(root: Path, test_data) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(test_data["bbb"], root / "bbb.mp4")
    shutil.copy(test_data["astronaut"], root / "astronaut.png")
    for name, caption in CAPTIONS.items():
        (root / name).with_suffix(".txt").write_text(caption)
    return root


def silent_video(path: Path) -> Path:
    """17 frames of noise at 24 fps, 96x64, without an audio stream."""
    write_video(torch.rand(17, 64, 96, 3, generator=torch.Generator().manual_seed(3)), path, fps=24)
    path.with_suffix(".txt").write_text("noise without sound")
    return path


def corrupt_sound_video(path: Path) -> Path:
    """A clip whose picture decodes and whose AAC packets are random bytes."""
    t = torch.arange(round(48000 * 17 / 24)) / 48000
    wave = 0.5 * torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 660 * t)])
    good = write_video(torch.rand(17, 64, 96, 3, generator=torch.Generator().manual_seed(4)),
                       path.with_suffix(".good.mp4"), fps=24, audio=wave, audio_sample_rate=48000)
    rng = np.random.default_rng(0)
    with av.open(str(good)) as inp, av.open(str(path), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in (inp.streams.video[0], inp.streams.audio[0])}
        for packet in inp.demux():
            if packet.dts is None:
                continue
            if packet.stream.type == "audio":
                garbage = av.Packet(bytes(rng.integers(0, 256, packet.size, dtype=np.uint8)))
                garbage.pts, garbage.dts, garbage.time_base = packet.pts, packet.dts, packet.time_base
                packet = garbage
                packet.stream = streams[inp.streams.audio[0].index]
            else:
                packet.stream = streams[inp.streams.video[0].index]
            out.mux(packet)
    good.unlink()
    path.with_suffix(".txt").write_text("a clip with broken sound")
    return path


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def no_temp_files(cache: Path) -> bool:
    return not [p for p in cache.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def cache_all(ds, models, cache: Path, *, missing_audio="silence", **kw):
    text = cache_text(ds, kw.pop("entry", models.entry), cache, encoder_id=models.text_id, layout=LTX2_CACHE_LAYOUT)
    latents = cache_latents(ds, kw.pop("vae", models.vaes.video), cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                            audio_vae=kw.pop("audio_vae", models.vaes.audio), missing_audio=missing_audio,
                            **SETTINGS, **kw)
    return text, latents


def load(ds, models, cache: Path, **kw):
    return load_cached_dataset(ds, cache, encoder_id=models.text_id, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                               audio=True, missing_audio=kw.pop("missing_audio", "silence"), **SETTINGS, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory, test_data, models):
    """BBB (17 frames at its own 25 fps, with its sound) and a photo (silence), text- and latent-cached."""
    root = tmp_path_factory.mktemp("built")
    ds = scan_folder(make_folder(root / "data", test_data))
    entry, vae = CountingEntry(models.entry), CountingVAE(models.vaes.video)
    cache = root / "cache"
    text, latents = cache_all(ds, models, cache, entry=entry, vae=vae)
    return SimpleNamespace(ds=ds, cache=cache, entry=entry, vae=vae, text=text, latents=latents)


# ------------------------------------------------------------------------------------------------ text entries


def test_text_cache_stores_padded_gemma_features_and_mask(built, models):
    assert (built.text.written, built.text.skipped) == (3, 0)
    assert sorted(built.entry.calls) == ["", "a big rabbit wakes up", "an astronaut"]  # one template: videos, images
    samples = {s.item_id: s for s in load(built.ds, models, built.cache)}
    D = tiny_transformer_metadata()["caption_channels"]
    for item_id, caption in CAPTIONS.items():
        sample = samples[item_id]
        meta = read_safetensors_header(sample.text_path)[1]
        assert meta["family"] == LTX2_FAMILY.name and meta["encoder_id"] == models.text_id
        (adapted,) = ltx2_samples_from_cache([sample])
        features, mask = encode_prompts(models.encoder, [caption])
        assert adapted.text.shape == (MAX_LENGTH, D) and adapted.text.dtype == torch.float32
        assert adapted.text_mask.dtype == torch.bool and adapted.text_mask.shape == (MAX_LENGTH,)
        assert torch.equal(adapted.text, features[0]) and torch.equal(adapted.text_mask, mask[0])
        n = int(mask.sum())
        assert n > 1 and not adapted.text_mask[:-n].any() and adapted.text_mask[-n:].all()  # left padding
    empty, empty_mask = ltx2_empty_text_from_cache(built.cache, models.text_id)
    assert empty.shape == (MAX_LENGTH, D) and int(empty_mask.sum()) == 1  # <bos> only
    assert torch.equal(empty, encode_prompts(models.encoder, [""])[0][0])
    manifest = json.loads((built.cache / "text" / "manifest.json").read_text())["entries"]
    assert {e["family"] for e in manifest.values()} == {LTX2_FAMILY.name}
    assert {e["file"] for e in manifest.values()} == {p.name for p in entries(built.cache / "text")}


def test_padded_entries_refuse_wrong_encoder_output():
    entry = padded_text_entries(lambda prompts: (torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"\[1, 4, 3\] and \[1, 5\]; expected \[1, L, D\] and \[1, L\]"):
        entry("a cat", "plain")
    empty = padded_text_entries(lambda prompts: (torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="marks no real token"):
        empty("a cat", "plain")


# ---------------------------------------------------------------------------------------------- latent entries


def test_latent_cache_stores_video_and_sound_latents(built, models):
    assert (built.latents.written, built.latents.skipped, built.latents.problems) == (2, 0, [])
    samples = {s.item_id: s for s in load(built.ds, models, built.cache)}
    items = {item.source_id: item for item in built.ds.items}
    bbb, photo = samples["bbb.mp4"], samples["astronaut.png"]
    assert bbb.bucket == (96, 64) and bbb.frames == 17 and bbb.fps == 25.0  # BBB keeps its own frame rate
    assert photo.bucket == (64, 64) and photo.frames == 1 and photo.fps == FMT.default_fps
    for sample in (bbb, photo):
        width, height = sample.bucket
        assert width % 32 == 0 and height % 32 == 0
        item = items[sample.item_id]
        indices = list(range(sample.frames))
        got = read_latent(sample)
        pixels = load_clip(item, indices, Bucket(width, height))
        assert got["latent"].shape == (128, (sample.frames - 1) // 8 + 1, height // 32, width // 32)
        assert torch.equal(got["latent"], models.vaes.video.encode(pixels[None])[0])  # normalised VAE output
        wave = load_clip_audio(item, indices, SPEC, missing="silence")
        samples_16k = round(sample.frames / sample.fps * 16000)
        assert wave.shape == (2, samples_16k)
        # the audio VAE's own length: ceil((floor(S / 160) + 1) / 4) latent steps (hop 160, time ÷ 4)
        steps = math.ceil((samples_16k // 160 + 1) / 4)
        assert got["audio"].shape == (8, steps, 16)
        assert torch.equal(got["audio"], models.vaes.audio.encode(wave[None], 16000)[0])
    assert read_latent(photo)["audio"].abs().sum() > 0  # the encoded silence is a latent too, not zeros
    meta = read_safetensors_header(bbb.latent_path)[1]
    assert (meta["family"], meta["audio_source"], meta["fps"]) == (LTX2_FAMILY.name, "track", "25.0")
    assert float(meta["audio_duration"]) == pytest.approx(17 / 25)
    assert read_safetensors_header(photo.latent_path)[1]["audio_source"] == "silence"
    assert "first" not in read_latent(bbb)  # i2v conditions on the clip's own first latent frame


def test_image_to_video_adds_nothing_for_ltx2(built, models):
    vae = CountingVAE(models.vaes.video)
    report = cache_latents(built.ds, vae, built.cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT, i2v=True,
                           audio_vae=models.vaes.audio, missing_audio="silence", **SETTINGS)
    assert (report.written, report.skipped, vae.calls) == (0, 2, [])
    first = models.vaes.video.encode(load_clip(built.ds.items[1], [0], Bucket(96, 64))[None])[0]
    clip = read_latent(next(s for s in load(built.ds, models, built.cache, i2v=True) if s.item_id == "bbb.mp4"))
    # the causal VAE encodes the first latent frame from the first frame alone
    torch.testing.assert_close(clip["latent"][:, :1], first, rtol=0, atol=1e-4)


def test_samples_feed_the_ltx2_training_adapter(built, models, tmp_path):
    samples = ltx2_samples_from_cache(load(built.ds, models, built.cache))
    fields = ("latent", "text", "text_mask", "fps", "bucket", "frames", "item_id", "repeats", "audio")
    assert all(hasattr(s, f) for s in samples for f in fields) and set(LTX2Sample.__dataclass_fields__) == set(fields)
    dit = LTX2DiT(LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())).requires_grad_(False)
    adapter = LTX2TrainingAdapter(models.encoder.projection)
    config = ltx2_train_config(rank=2, alpha=2.0, max_steps=2, compute_dtype="fp32", lora_dtype="fp32",
                               save_dtype="fp32", with_audio=True, caption_dropout=0.5, i2v="first")
    bbb = next(s for s in samples if s.item_id == "bbb.mp4")
    batch = adapter.load_batch(dit, [bbb], config)
    assert batch.video.shape == (1, 128, 3, 2, 3) and batch.audio.shape == (1, 8, 18, 16) and batch.fps == [25.0]
    empty = ltx2_empty_text_from_cache(built.cache, models.text_id)
    assert adapter.empty_caption(dit, empty, config)[1].sum() == 1
    result = train_lora(dit, samples, empty, config, tmp_path / "run", adapter=adapter)
    assert result.steps == 2 and result.lora_path.is_file()


def test_a_dataset_extraction_gives_each_clip_its_own_sound(tmp_path, test_data, models):
    slide = FrameExtraction("slide", (9,), frame_stride=50)
    ds = scan_folder(make_folder(tmp_path / "data", test_data), frame_extraction=slide)
    # the cacher's own 'uniform' cannot carry sound, but these items are cut by their dataset's extraction
    spec = FrameSpec(17, "uniform", target_fps=None, latent_format=FMT)
    settings = dict(vae_id=models.vae_id, frame_spec=spec, base_resolution=(96, 64), layout=LTX2_CACHE_LAYOUT)
    cache = tmp_path / "cache"
    cache_text(ds, models.entry, cache, encoder_id=models.text_id, layout=LTX2_CACHE_LAYOUT)
    cache_latents(ds, models.vaes.video, cache, audio_vae=models.vaes.audio, missing_audio="silence", **settings)
    samples = load_cached_dataset(ds, cache, encoder_id=models.text_id, audio=True, missing_audio="silence",
                                  **settings)
    clips = [s for s in samples if s.item_id == "bbb.mp4"]
    starts = list(range(0, 132 - 9 + 1, 50))  # BBB keeps its 132 frames at 25 fps
    assert [(s.frames, s.fps) for s in clips] == [(9, 25.0)] * len(starts)
    item = next(i for i in ds.items if i.source_id == "bbb.mp4")
    for start, sample in zip(starts, clips):
        meta = read_safetensors_header(sample.latent_path)[1]
        assert float(meta["audio_start"]) == pytest.approx(start / 25)
        assert float(meta["audio_duration"]) == pytest.approx(9 / 25)
    wave = load_clip_audio(item, list(range(starts[1], starts[1] + 9)), spec, missing="silence")
    assert torch.equal(read_latent(clips[1])["audio"], models.vaes.audio.encode(wave[None], 16000)[0])


# ------------------------------------------------------------------------------------------------------ keys


def test_keys_follow_the_model_version(built, files, models, tmp_path):
    again = load_models(files.ckpt, files.gemma)
    assert (again.text_id, again.vae_id) == (models.text_id, models.vae_id)  # the same file: the same id
    other = load_models(write_tiny_checkpoint(tmp_path / "other.safetensors", seed=1), files.gemma)
    assert other.text_id != models.text_id and other.vae_id != models.vae_id  # another checkpoint
    bf16 = {k: v.to(torch.bfloat16) for k, v in models.vaes.video.model.state_dict().items()}
    assert weights_identity(bf16, "tiling=False", models.vaes.audio) != models.vae_id  # another dtype
    with pytest.raises(CacheError) as err:
        load_cached_dataset(built.ds, built.cache, encoder_id=models.text_id, vae_id=other.vae_id,
                            layout=LTX2_CACHE_LAYOUT, audio=True, missing_audio="silence", **SETTINGS)
    message = str(err.value)
    assert "2 latent entries are missing" in message and "never reused across models" in message
    assert f"2 by model family 'ltx-2' (vae_id {models.vae_id[:12]}" in message
    with pytest.raises(CacheError) as err:
        load_cached_dataset(built.ds, built.cache, encoder_id=other.text_id, vae_id=models.vae_id,
                            layout=LTX2_CACHE_LAYOUT, audio=True, missing_audio="silence", **SETTINGS)
    message = str(err.value)
    assert "3 text entries are missing" in message and "latent entries" not in message
    assert f"3 by model family 'ltx-2' (encoder_id {models.text_id[:12]}" in message


def test_a_k5_cache_is_refused_for_ltx2_and_the_reverse(built, models, tmp_path):
    """The same dataset and folder cached with the Kandinsky 5 (family-less) layout: neither family reads the
    other's entries, and the errors name who made them."""
    cache = tmp_path / "cache"
    shutil.copytree(built.cache, cache)

    class K5Shaped:  # a stand-in for the K5 VAE: 16 channels, ×8 / ×4
        def encode(self, video):
            return torch.zeros(video.shape[0], 16, (video.shape[2] - 1) // 4 + 1, video.shape[3] // 8,
                               video.shape[4] // 8)

    class K5Text:  # a stand-in for the K5 text encoder
        def encode(self, prompts, template):
            return SimpleNamespace(text=torch.ones(1, 3, 8), text_mask=torch.ones(1, 3), pooled=torch.ones(1, 4))

    k5_spec = FrameSpec(17, latent_format=K5_LATENT_FORMAT)
    cache_text(built.ds, K5Text(), cache, encoder_id="k5-text")
    cache_latents(built.ds, K5Shaped(), cache, vae_id="k5-vae", frame_spec=k5_spec, base_resolution=64)
    k5 = load_cached_dataset(built.ds, cache, encoder_id="k5-text", vae_id="k5-vae", frame_spec=k5_spec,
                             base_resolution=64)
    with pytest.raises(CacheError, match=r"made by no model family \(a format-1 Kandinsky 5 cache\), not by the "
                                         r"LTX-2 cachers"):
        ltx2_samples_from_cache(k5)
    with pytest.raises(CacheError) as err:  # an LTX-2 run given the K5 settings' folder without its own entries
        load_cached_dataset(built.ds, cache, encoder_id="k5-text", vae_id="k5-vae", layout=LTX2_CACHE_LAYOUT,
                            audio=True, missing_audio="silence", **SETTINGS)
    assert "by no model family (a format-1 Kandinsky 5 cache) (vae_id k5-vae" in str(err.value)
    ltx = load(built.ds, models, cache)
    (wrong,) = samples_from_cache([k5[0].__class__(**{**vars(ltx[0]), "layout": CacheLayout()})])
    with pytest.raises(CacheError, match="was made by model family 'ltx-2'.*not by no model family"):
        wrong.latent  # noqa: B018 - an LTX-2 file read as a K5 entry
    shutil.rmtree(cache / "latents")
    shutil.copytree(built.cache / "latents", cache / "latents")
    with pytest.raises(CacheError) as err:  # a K5 run on a folder with only LTX-2 latents
        load_cached_dataset(built.ds, cache, encoder_id="k5-text", vae_id="k5-vae", frame_spec=k5_spec,
                            base_resolution=64)
    assert "2 by model family 'ltx-2'" in str(err.value) and "never reused across models" in str(err.value)


# ------------------------------------------------------------------------------------------------- bad input


def test_a_clip_without_sound_is_named_or_gets_silence(tmp_path, test_data, models):
    data = make_folder(tmp_path / "data", test_data)
    silent_video(data / "silent.mp4")
    ds = scan_folder(data)
    cache = tmp_path / "cache"
    with pytest.raises(NoAudioError) as err:
        cache_latents(ds, models.vaes.video, cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                      audio_vae=models.vaes.audio, **SETTINGS)
    message = str(err.value)
    assert "2 training items have no audio track" in message and str(data / "silent.mp4") in message
    assert str(data / "astronaut.png") in message and str(data / "bbb.mp4") not in message
    assert "'silence'" in message and "turn audio off" in message
    assert entries(cache / "latents") == []  # nothing written under a final name
    with pytest.raises(NoAudioError, match="silent.mp4"):
        load(ds, models, cache, missing_audio="error")
    with pytest.raises(ValueError, match="'uniform'.*use 'head' or 'chunks'"):
        cache_latents(ds, models.vaes.video, cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                      audio_vae=models.vaes.audio, frame_spec=FrameSpec(17, "uniform", latent_format=FMT))

    report = cache_latents(ds, models.vaes.video, cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                           audio_vae=models.vaes.audio, missing_audio="silence", **SETTINGS)
    assert (report.written, report.problems) == (3, [])
    silent = next(p for p in entries(cache / "latents")
                  if read_safetensors_header(p)[1]["item"] == "silent.mp4")
    got = read_safetensors_header(silent)[1]
    assert got["audio_source"] == "silence" and got["fps"] == "24.0"
    from safetensors.torch import load_file
    expected = models.vaes.audio.encode(torch.zeros(1, 2, round(17 / 24 * 16000)), 16000)[0]
    assert torch.equal(load_file(silent)["audio"], expected)


def test_corrupt_sound_and_short_clips_are_problems_naming_the_file(tmp_path, test_data, models):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(test_data["astronaut"], data / "astronaut.png")
    (data / "astronaut.txt").write_text("an astronaut")
    corrupt_sound_video(data / "broken_sound.mp4")
    ds = scan_folder(data)
    cache = tmp_path / "cache"
    report = cache_latents(ds, models.vaes.video, cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                           audio_vae=models.vaes.audio, missing_audio="silence", **SETTINGS)
    assert report.written == 1 and len(report.problems) == 1
    problem = report.problems[0]
    assert problem.path == data / "broken_sound.mp4" and "its audio track cannot be decoded" in problem.message
    assert "re-encode the file's sound" in problem.message and "turn audio off" in problem.message
    assert len(entries(cache / "latents")) == 1 and no_temp_files(cache)  # only the photo's entry
    assert len(list((cache / "latents").glob("*.failed.json"))) == 1
    # audio off: the picture is fine, so the same clip caches
    video_only = cache_latents(ds, models.vaes.video, cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                               **SETTINGS)
    assert (video_only.written, video_only.problems) == (2, [])
    # 25 frames do not fit a 17-frame clip: the problem names the file and the longest 8k+1 clip it gives
    long = cache_latents(ds, models.vaes.video, cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                         frame_spec=FrameSpec(25, latent_format=FMT), base_resolution=(96, 64))
    (short,) = long.problems
    assert short.path == data / "broken_sound.mp4" and "target_frames ≤ 17" in short.message


# ---------------------------------------------------------------------------------------- interruption, repair


def test_interrupted_cache_resumes(tmp_path, test_data, models):
    ds = scan_folder(make_folder(tmp_path / "data", test_data))
    cache = tmp_path / "cache"
    with pytest.raises(Stop):
        cache_text(ds, models.entry, cache, encoder_id=models.text_id, layout=LTX2_CACHE_LAYOUT,
                   check_interrupt=stop_after(1))
    with pytest.raises(Stop):
        cache_latents(ds, models.vaes.video, cache, vae_id=models.vae_id, layout=LTX2_CACHE_LAYOUT,
                      audio_vae=models.vaes.audio, missing_audio="silence", check_interrupt=stop_after(1),
                      **SETTINGS)
    assert no_temp_files(cache) and len(entries(cache / "text")) == 1 and len(entries(cache / "latents")) == 1
    with pytest.raises(CacheError, match="1 latent entries are missing"):
        load(ds, models, cache)
    entry, vae = CountingEntry(models.entry), CountingVAE(models.vaes.video)
    text, latents = cache_all(ds, models, cache, entry=entry, vae=vae)
    assert (text.written, text.skipped, latents.written, latents.skipped) == (2, 1, 1, 1)
    assert len(vae.calls) == 1 and len(entry.calls) == 2
    assert [s.item_id for s in load(ds, models, cache)] == ["astronaut.png", "bbb.mp4"]


def test_damaged_entries_are_repaired(built, models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built.cache, cache)
    samples = {s.item_id: s for s in load(built.ds, models, cache)}
    latent, text = samples["bbb.mp4"].latent_path, samples["astronaut.png"].text_path
    latent.write_bytes(latent.read_bytes()[: latent.stat().st_size // 2])
    text.write_bytes(b"\x00" * 16)
    with pytest.raises(CacheError) as err:
        load(built.ds, models, cache)
    message = str(err.value)
    assert "the cache is damaged" in message and latent.name in message and text.name in message
    assert "re-encodes exactly the damaged" in message
    entry, vae = CountingEntry(models.entry), CountingVAE(models.vaes.video)
    text_report, latent_report = cache_all(built.ds, models, cache, entry=entry, vae=vae)
    assert entry.calls == ["an astronaut"] and (text_report.written, text_report.skipped) == (1, 2)
    assert vae.calls == [(1, 3, 17, 64, 96)] and (latent_report.written, latent_report.skipped) == (1, 1)
    repaired = {s.item_id: s for s in load(built.ds, models, cache)}
    assert torch.equal(read_latent(repaired["bbb.mp4"])["audio"], read_latent(samples["bbb.mp4"])["audio"])


def test_the_library_names_the_registered_ltx2_family():
    assert LTX2_CACHE_LAYOUT.family == LTX2_FAMILY.name
