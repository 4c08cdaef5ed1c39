"""Text and latent caches: files and shapes on tiny real-format models, keys that follow their inputs,
interruption, loading the cached dataset back, bad input."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.family import LatentFormat
from cinetune.core.media import write_video
from cinetune.k5.family import K5_LATENT_FORMAT
from cinetune.k5.text import load_k5_text_encoder
from cinetune.k5.tiny import write_tiny_clip, write_tiny_qwen, write_tiny_vae
from cinetune.k5.vae import load_k5_vae
from cinetune.training.cache import (
    CacheError,
    CacheLayout,
    cache_latents,
    cache_text,
    empty_text_path,
    encoder_identity,
    load_cached_dataset,
    read_latent,
    read_text,
    weights_identity,
)
from cinetune.training.data import (
    Bucket,
    DatasetError,
    FrameSpec,
    dataset_summary,
    from_tensors,
    load_clip,
    scan_folder,
)

SPEC = FrameSpec(17, "head", 24.0, latent_format=K5_LATENT_FORMAT)
SETTINGS = dict(frame_spec=SPEC, base_resolution=64)  # buckets 80x48 (BBB, chelsea) and 64x64 (astronaut)
CAPTIONS = {"bbb.mp4": "a big rabbit wakes up", "astronaut.png": "an astronaut", "chelsea.png": "a ginger cat"}


class Counting:
    """Wraps an encoder or VAE and records what each ``encode`` call got."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def encode(self, x, *args, **kwargs):
        self.calls.append((x[0], args[0] if args else kwargs.get("template")) if isinstance(x, list)
                          else tuple(x.shape))
        return self.inner.encode(x, *args, **kwargs)


class Stop(Exception):
    pass


def stop_after(entries: int):
    calls = itertools.count(1)

    def check():
        if next(calls) > entries:
            raise Stop

    return check


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen_tokenizer_dir, clip_tokenizer_dir):
    root = tmp_path_factory.mktemp("models")
    qwen = write_tiny_qwen(root / "qwen", qwen_tokenizer_dir)
    clip = write_tiny_clip(root / "clip", clip_tokenizer_dir)
    vae = write_tiny_vae(root / "vae.safetensors")
    return SimpleNamespace(encoder=load_k5_text_encoder(qwen, clip, dtype=torch.float32),
                           vae=load_k5_vae(vae, tiling=False),
                           encoder_id=encoder_identity(qwen, clip, dtype=torch.float32),
                           vae_id=encoder_identity(vae, dtype=torch.float32))


def make_folder(root: Path, test_data) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(test_data["bbb"], root / "bbb.mp4")
    shutil.copy(test_data["astronaut"], root / "astronaut.png")
    shutil.copy(test_data["chelsea"], root / "chelsea.png")
    for name, caption in CAPTIONS.items():
        (root / name).with_suffix(".txt").write_text(caption)
    return root


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def no_temp_files(cache: Path) -> bool:
    return not [p for p in cache.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, test_data, models):
    """A dataset of BBB (17 frames) and two photos, text- and latent-cached with i2v."""
    root = tmp_path_factory.mktemp("built")
    ds = scan_folder(make_folder(root / "data", test_data))
    te, vae = Counting(models.encoder), Counting(models.vae)
    cache = root / "cache"
    text_report = cache_text(ds, te, cache, encoder_id=models.encoder_id)
    latent_report = cache_latents(ds, vae, cache, vae_id=models.vae_id, i2v=True, **SETTINGS)
    return SimpleNamespace(ds=ds, cache=cache, te=te, vae=vae, text_report=text_report, latent_report=latent_report)


@pytest.fixture
def fresh(tmp_path, test_data):
    return make_folder(tmp_path / "data", test_data)


# --------------------------------------------------------------------------------------------- files and shapes


def test_text_cache_holds_each_caption_once_plus_empty_ones(built, models):
    r = built.text_report
    assert (r.written, r.skipped, r.problems) == (5, 0, [])
    assert sorted(built.te.calls) == sorted([("a big rabbit wakes up", "video"), ("an astronaut", "image"),
                                             ("a ginger cat", "image"), ("", "video"), ("", "image")])
    assert len(entries(built.cache / "text")) == 5 and no_temp_files(built.cache)
    sample = {s.item_id: s for s in load_cached_dataset(built.ds, built.cache, encoder_id=models.encoder_id,
                                                        vae_id=models.vae_id, i2v=True, **SETTINGS)}
    for item_id, template in [("bbb.mp4", "video"), ("chelsea.png", "image")]:
        text, pooled = read_text(sample[item_id].text_path)
        ref = models.encoder.encode([CAPTIONS[item_id]], template)
        n = int(ref.text_mask[0].sum())
        assert text.dtype == pooled.dtype == torch.float32 and text.shape == (n, 64) and pooled.shape == (64,)
        assert torch.equal(text, ref.text[0, :n]) and torch.equal(pooled, ref.pooled[0])
    empty, _ = read_text(empty_text_path(built.cache, models.encoder_id, "video"))
    assert empty.shape[0] == 1  # only <|im_end|> survives the crop
    manifest = json.loads((built.cache / "text" / "manifest.json").read_text())["entries"]
    assert {e["file"] for e in manifest.values()} == {p.name for p in entries(built.cache / "text")}
    assert {(e["caption"], e["template"]) for e in manifest.values()} == set(built.te.calls)


def test_latent_cache_shapes_raw_latents_and_i2v_frames(built, models):
    r = built.latent_report
    assert (r.written, r.skipped, r.problems) == (3, 0, [])
    # BBB: the clip, then its first and last frame alone; photos: one call each (first = last = latent)
    assert sorted(built.vae.calls) == sorted([(1, 3, 17, 48, 80), (1, 3, 1, 48, 80), (1, 3, 1, 48, 80),
                                              (1, 3, 1, 64, 64), (1, 3, 1, 48, 80)])
    samples = load_cached_dataset(built.ds, built.cache, encoder_id=models.encoder_id, vae_id=models.vae_id,
                                  i2v=True, **SETTINGS)
    by_id = {s.item_id: s for s in samples}
    items = {item.source_id: item for item in built.ds.items}
    expected = {"bbb.mp4": ((80, 48), 17, (16, 5, 6, 10)), "astronaut.png": ((64, 64), 1, (16, 1, 8, 8)),
                "chelsea.png": ((80, 48), 1, (16, 1, 6, 10))}
    for item_id, (bucket, frames, shape) in expected.items():
        s = by_id[item_id]
        lat = read_latent(s)
        assert (s.bucket, s.frames) == (bucket, frames)
        assert lat["latent"].shape == shape and lat["latent"].dtype == torch.float32
        assert lat["first"].shape == lat["last"].shape == (16, 1, *shape[2:])
    bbb = read_latent(by_id["bbb.mp4"])
    indices = [(2 * i * 25 + 24) // 48 for i in range(17)]  # 24 fps from 25: nearest source frame, ties up
    for name, index in [("first", indices[0]), ("last", indices[-1])]:
        alone = models.vae.encode(load_clip(items["bbb.mp4"], [index], Bucket(80, 48))[None])[0]
        assert torch.equal(bbb[name], alone), name
    assert not torch.equal(bbb["last"], bbb["latent"][:, -1:])  # not a slice of the clip's latent
    photo = read_latent(by_id["astronaut.png"])
    direct = models.vae.encode(load_clip(items["astronaut.png"], [0], Bucket(64, 64))[None])[0]
    assert torch.equal(photo["latent"], direct)  # raw: not multiplied by the scaling factor
    assert torch.equal(photo["first"], direct) and torch.equal(photo["last"], direct)
    manifest = json.loads((built.cache / "latents" / "manifest.json").read_text())["entries"]
    assert manifest[by_id["bbb.mp4"].key]["indices"] == indices
    assert {e["file"] for e in manifest.values()} == {p.name for p in entries(built.cache / "latents")}


def test_load_cached_dataset_returns_exactly_the_samples(built, models):
    samples = load_cached_dataset(built.ds, built.cache, encoder_id=models.encoder_id, vae_id=models.vae_id,
                                  i2v=True, **SETTINGS)
    assert [s.item_id for s in samples] == ["astronaut.png", "bbb.mp4", "chelsea.png"]
    assert {s.latent_path for s in samples} == set(entries(built.cache / "latents"))
    assert {s.key for s in samples} == {p.stem for p in entries(built.cache / "latents")}
    assert [(s.caption, s.kind, s.template, s.repeats) for s in samples] == [
        ("an astronaut", "image", "image", 1), ("a big rabbit wakes up", "video", "video", 1),
        ("a ginger cat", "image", "image", 1)]
    assert all(s.text_path.parent == built.cache / "text" and s.text_path.is_file() for s in samples)
    assert len({s.text_key for s in samples}) == 3


def test_load_cached_dataset_names_what_is_missing(built, models, tmp_path):
    # the latents of the non-i2v settings were never built
    with pytest.raises(CacheError) as err:
        load_cached_dataset(built.ds, built.cache, encoder_id=models.encoder_id, vae_id=models.vae_id, **SETTINGS)
    message = str(err.value)
    assert "3 latent entries are missing" in message and "latent cacher" in message and "i2v off" in message
    assert all(name in message for name in ("bbb.mp4", "astronaut.png", "chelsea.png"))
    # a cache folder with text only
    shutil.copytree(built.cache / "text", tmp_path / "cache" / "text")
    with pytest.raises(CacheError, match="bbb.mp4"):
        load_cached_dataset(built.ds, tmp_path / "cache", encoder_id=models.encoder_id, vae_id=models.vae_id,
                            i2v=True, **SETTINGS)
    # another text encoder: every caption and both empty captions are missing
    with pytest.raises(CacheError) as err:
        load_cached_dataset(built.ds, built.cache, encoder_id="other", vae_id=models.vae_id, i2v=True, **SETTINGS)
    message = str(err.value)
    assert "5 text entries are missing" in message and "text cacher" in message and "a ginger cat" in message
    assert "latent entries are missing" not in message


def test_damaged_entries_are_reported_as_damaged_and_reencoded_exactly(built, models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built.cache, cache)
    load = dict(encoder_id=models.encoder_id, vae_id=models.vae_id, i2v=True, **SETTINGS)
    samples = {s.item_id: s for s in load_cached_dataset(built.ds, cache, **load)}
    latent, text = samples["bbb.mp4"].latent_path, samples["chelsea.png"].text_path
    latent.write_bytes(latent.read_bytes()[: latent.stat().st_size // 2])  # truncated
    text.write_bytes(b"\x00" * 16)  # not safetensors any more
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.rglob("*.safetensors") if p not in (latent, text)}
    with pytest.raises(CacheError) as err:
        load_cached_dataset(built.ds, cache, **load)
    message = str(err.value)
    assert "the cache is damaged" in message and "missing" not in message and "other inputs" not in message
    assert f"1 latent entries in {cache / 'latents'} are damaged" in message and latent.name in message
    assert "bbb.mp4" in message and f"1 text entries in {cache / 'text'} are damaged" in message
    assert text.name in message and "'a ginger cat'" in message and "re-encodes exactly the damaged" in message

    te, vae = Counting(models.encoder), Counting(models.vae)
    text_report = cache_text(built.ds, te, cache, encoder_id=models.encoder_id)
    latent_report = cache_latents(built.ds, vae, cache, vae_id=models.vae_id, i2v=True, **SETTINGS)
    assert te.calls == [("a ginger cat", "image")] and (text_report.written, text_report.skipped) == (1, 4)
    assert (latent_report.written, latent_report.skipped) == (1, 2) and len(vae.calls) == 3  # clip, first, last
    assert all(p.stat().st_mtime_ns == mtime and p.read_bytes() == data for p, (mtime, data) in before.items())
    assert [s.item_id for s in load_cached_dataset(built.ds, cache, **load)] == ["astronaut.png", "bbb.mp4",
                                                                                 "chelsea.png"]
    assert set(text_report.entries) == set(entries(cache / "text"))
    assert set(latent_report.entries) == set(entries(cache / "latents")) and latent in latent_report.entries


def test_damaged_and_missing_entries_are_told_apart(built, models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built.cache, cache)
    samples = load_cached_dataset(built.ds, cache, encoder_id=models.encoder_id, vae_id=models.vae_id, i2v=True,
                                  **SETTINGS)
    samples[0].latent_path.write_bytes(samples[0].latent_path.read_bytes()[:-10])
    samples[1].latent_path.unlink()
    with pytest.raises(CacheError) as err:
        load_cached_dataset(built.ds, cache, encoder_id=models.encoder_id, vae_id=models.vae_id, i2v=True,
                            **SETTINGS)
    message = str(err.value)
    assert "the cache is incomplete" in message and "1 latent entries in" in message and "are damaged" in message
    assert "1 latent entries are missing" in message and "(0 files there are for other" in message


def test_read_functions_reject_missing_and_damaged_files(built, models, tmp_path):
    sample = load_cached_dataset(built.ds, built.cache, encoder_id=models.encoder_id, vae_id=models.vae_id,
                                 i2v=True, **SETTINGS)[0]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(sample.latent_path.read_bytes()[:-10])
    with pytest.raises(CacheError, match="truncated.*damaged: run the latent cacher again"):
        read_latent(replace(sample, latent_path=cut))
    with pytest.raises(CacheError, match="not found.*text cacher"):
        read_text(tmp_path / "nothing.safetensors")


# ------------------------------------------------------------------------------------------------------ keys


def documented_key(payload: dict) -> str:
    """The key recipe of the module notes: SHA-256 of the compact, key-sorted JSON of the payload."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_keys_follow_the_documented_recipe(built, models):
    """Kandinsky 5 caches written before the latent format existed stay valid: same keys (format version 1)."""
    def file_identity(name: str) -> list:
        path = built.ds.items[[i.source_id for i in built.ds.items].index(name)].path
        st = path.stat()
        return ["file", str(path.absolute()), st.st_size, st.st_mtime_ns]

    bbb_indices = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17]  # 17 frames at 24 fps from 25 fps
    expected = {
        "astronaut.png": documented_key({"v": 1, "item": file_identity("astronaut.png"), "indices": [0],
                                          "bucket": [64, 64], "vae": models.vae_id, "i2v": True}),
        "bbb.mp4": documented_key({"v": 1, "item": file_identity("bbb.mp4"), "indices": bbb_indices,
                                    "bucket": [80, 48], "vae": models.vae_id, "i2v": True}),
    }
    samples = {s.item_id: s for s in load_cached_dataset(built.ds, built.cache, encoder_id=models.encoder_id,
                                                         vae_id=models.vae_id, i2v=True, **SETTINGS)}
    for item_id, key in expected.items():
        assert samples[item_id].key == key and (built.cache / "latents" / f"{key}.safetensors").is_file()
    text_key = documented_key({"v": 1, "caption": "an astronaut", "template": "image",
                               "encoder": models.encoder_id})
    assert samples["astronaut.png"].text_key == text_key
    assert (built.cache / "text" / f"{text_key}.safetensors").is_file()
    assert empty_text_path(built.cache, models.encoder_id, "video").stem == documented_key(
        {"v": 1, "caption": "", "template": "video", "encoder": models.encoder_id})


class ShapedVAE:
    """Stand-in VAE of a given latent geometry: [B, 3, F, H, W] → [B, C, (F−1)/t + 1, H/s, W/s] (pooled pixels)."""

    def __init__(self, channels: int, spatial: int, temporal: int):
        self.channels, self.spatial, self.temporal = channels, spatial, temporal

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        first, rest = video[:, :, :1], video[:, :, 1:]
        frames = torch.cat([first, rest.unflatten(2, (-1, self.temporal)).mean(3)], dim=2) if rest.shape[2] else first
        pooled = torch.nn.functional.avg_pool3d(frames, (1, self.spatial, self.spatial))
        return pooled.mean(1, keepdim=True).expand(-1, self.channels, -1, -1, -1).contiguous()


def read_latent_file(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(path)["latent"]


def test_latent_cache_follows_another_latent_format(tmp_path):
    """An LTX-2-shaped format (128 channels, ×32, 8k+1 frames, 32 px): buckets, clips and shapes follow it."""
    ltx = LatentFormat(name="ltx-2-shaped", channels=128, spatial_factor=32, temporal_factor=8, size_multiple=32,
                       default_fps=24.0)
    video = torch.rand(12, 70, 100, 3, generator=torch.Generator().manual_seed(1))
    ds = from_tensors([video], "noise", fps=24.0)
    spec = FrameSpec(9, latent_format=ltx)
    report = cache_latents(ds, ShapedVAE(128, 32, 8), tmp_path, vae_id="shaped", frame_spec=spec,
                           base_resolution=(96, 64))
    (entry,) = entries(tmp_path / "latents")
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())["entries"][entry.stem]
    assert manifest["bucket"] == [96, 64] and manifest["indices"] == list(range(9))
    assert report.written == 1 and read_latent_file(entry).shape == (128, 2, 2, 3)  # 9 frames → 2, 64/32, 96/32
    with pytest.raises(ValueError, match="bucket step 16 px is not a multiple of 32 px"):
        cache_latents(ds, ShapedVAE(128, 32, 8), tmp_path, vae_id="shaped", frame_spec=spec, bucket_step=16)


def test_a_vae_of_another_geometry_is_refused(tmp_path):
    ds = from_tensors([torch.rand(1, 64, 64, 3)], "noise")
    with pytest.raises(ValueError, match=r"latent of shape \[8, 1, 8, 8\], but latent format 'kandinsky-5' gives "
                                         r"\[16, 1, 8, 8\]"):
        cache_latents(ds, ShapedVAE(8, 8, 4), tmp_path, vae_id="wrong", **SETTINGS)
    assert entries(tmp_path / "latents") == []


def test_second_run_encodes_nothing(built, models):
    te, vae = Counting(models.encoder), Counting(models.vae)
    text = cache_text(built.ds, te, built.cache, encoder_id=models.encoder_id)
    latents = cache_latents(built.ds, vae, built.cache, vae_id=models.vae_id, i2v=True, **SETTINGS)
    assert (text.written, text.skipped, latents.written, latents.skipped) == (0, 5, 0, 3)
    assert te.calls == [] and vae.calls == []
    assert text.summary().splitlines() == [
        "5 captions (with the empty caption for caption dropout): 0 encoded, 5 reused from the cache; 0 files skipped",
        f"cache: {built.cache}"]
    assert latents.summary().splitlines()[0] == "3 clips: 0 encoded, 3 reused from the cache; 0 files skipped"
    first = built.text_report.summary().splitlines()[0]
    assert first.endswith(": 5 encoded, 0 reused from the cache; 0 files skipped")


def test_the_dataset_summary_counts_kinds_and_lists_problems(tmp_path, test_data):
    data = make_folder(tmp_path / "data", test_data)
    (data / "chelsea.txt").unlink()
    summary = dataset_summary(scan_folder(data)).splitlines()
    assert summary[0] == "2 items (1 video, 1 with sound, 1 image), 1 problem"
    assert len(summary) == 2 and str(data / "chelsea.png") in summary[1]
    (data / "bbb.mp4").unlink()
    shutil.copy(test_data["chelsea"], data / "second.png")
    (data / "second.txt").write_text("a second cat")
    assert dataset_summary(scan_folder(data, default_caption="a cat")) == "3 items (0 videos, 3 images), 0 problems"


def test_changed_caption_reencodes_one_text_entry_and_no_latent(fresh, models, tmp_path):
    cache = tmp_path / "cache"
    ds = scan_folder(fresh)
    cache_text(ds, models.encoder, cache, encoder_id=models.encoder_id)
    cache_latents(ds, models.vae, cache, vae_id=models.vae_id, **SETTINGS)
    (fresh / "chelsea.txt").write_text("a sleepy ginger cat")
    ds = scan_folder(fresh)
    te, vae = Counting(models.encoder), Counting(models.vae)
    text = cache_text(ds, te, cache, encoder_id=models.encoder_id)
    latents = cache_latents(ds, vae, cache, vae_id=models.vae_id, **SETTINGS)
    assert te.calls == [("a sleepy ginger cat", "image")] and (text.written, text.skipped) == (1, 4)
    assert vae.calls == [] and (latents.written, latents.skipped) == (0, 3)
    samples = load_cached_dataset(ds, cache, encoder_id=models.encoder_id, vae_id=models.vae_id, **SETTINGS)
    assert samples[2].caption == "a sleepy ginger cat"
    assert torch.equal(read_text(samples[2].text_path)[0],
                       models.encoder.encode(["a sleepy ginger cat"], "image").text[0])


def test_touched_video_reencodes_its_latents_only(fresh, models, tmp_path):
    cache = tmp_path / "cache"
    ds = scan_folder(fresh)
    cache_text(ds, models.encoder, cache, encoder_id=models.encoder_id)
    cache_latents(ds, models.vae, cache, vae_id=models.vae_id, **SETTINGS)
    st = (fresh / "bbb.mp4").stat()
    os.utime(fresh / "bbb.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    ds = scan_folder(fresh)
    te, vae = Counting(models.encoder), Counting(models.vae)
    text = cache_text(ds, te, cache, encoder_id=models.encoder_id)
    latents = cache_latents(ds, vae, cache, vae_id=models.vae_id, **SETTINGS)
    assert te.calls == [] and text.written == 0
    assert vae.calls == [(1, 3, 17, 48, 80)] and (latents.written, latents.skipped) == (1, 2)
    assert len(entries(cache / "latents")) == 4  # the old entry is kept (nothing cached is lost)


def test_in_memory_items_are_keyed_by_their_pixels(models, tmp_path):
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    ds = from_tensors([pixels], "noise")
    first = cache_latents(ds, models.vae, tmp_path, vae_id=models.vae_id, **SETTINGS)
    again = cache_latents(from_tensors([pixels.clone()], "noise"), models.vae, tmp_path, vae_id=models.vae_id,
                          **SETTINGS)
    changed = cache_latents(from_tensors([pixels * 0.5], "noise"), models.vae, tmp_path, vae_id=models.vae_id,
                            **SETTINGS)
    assert (first.written, again.skipped, changed.written) == (1, 1, 1)


def test_encoder_identity_follows_files_and_settings(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x" * 10)
    base = encoder_identity(model, dtype=torch.bfloat16)
    assert encoder_identity(str(model), dtype=torch.bfloat16) == base and len(base) == 32
    assert encoder_identity(model, dtype=torch.float32) != base
    assert encoder_identity(model, "tiling=256", dtype=torch.bfloat16) != base
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert encoder_identity(model, dtype=torch.bfloat16) != base
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        encoder_identity(tmp_path / "missing.safetensors")


def test_weights_identity_follows_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200))
    base = weights_identity(model)
    assert len(base) == 32 and weights_identity(model.state_dict()) == base
    twin = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200))
    twin.load_state_dict(model.state_dict())
    assert weights_identity(twin) == base  # the same weights loaded again
    with torch.no_grad():
        twin[0].weight[0, 0] += 1.0
    assert weights_identity(twin) != base  # other values (a fine-tune changes every weight)
    assert weights_identity({k: v.bfloat16() for k, v in model.state_dict().items()}) != base  # another dtype
    assert weights_identity(model, "tiling=512") != base and weights_identity("tiling=512", model) != \
        weights_identity(model, "tiling=512")
    odd = {"w": torch.ones(4, 4).to(torch.float8_e4m3fn), "mask": torch.tensor([True, False])}
    assert weights_identity(odd) != weights_identity({**odd, "mask": torch.tensor([True, True])})
    with pytest.raises(ValueError, match="holds no tensors"):
        weights_identity(torch.nn.ReLU())
    with pytest.raises(TypeError, match="modules, tensor mappings or strings"):
        weights_identity(3)
    with pytest.raises(ValueError, match="at least one"):
        weights_identity()


def test_cache_layout_checks_its_values():
    assert CacheLayout().describe() == "no model family (a format-1 Kandinsky 5 cache)"
    assert CacheLayout("ltx-2").describe() == "model family 'ltx-2'"
    with pytest.raises(ValueError, match="start with 'text'"):
        CacheLayout("x", text_tensors=("mask", "text"))
    with pytest.raises(ValueError, match="family must be a non-empty string"):
        CacheLayout("")


def test_a_family_layout_keys_its_entries_apart(built, models, tmp_path):
    """The same dataset, encoder and VAE ids under a layout with a family: other keys, the family in each file, and
    the family-less reader refuses those files."""
    layout = CacheLayout("some-family")
    cache = tmp_path / "cache"
    cache_text(built.ds, models.encoder, cache, encoder_id=models.encoder_id, layout=layout)
    cache_latents(built.ds, models.vae, cache, vae_id=models.vae_id, layout=layout, **SETTINGS)
    ours = load_cached_dataset(built.ds, cache, encoder_id=models.encoder_id, vae_id=models.vae_id, layout=layout,
                               **SETTINGS)
    k5 = load_cached_dataset(built.ds, built.cache, encoder_id=models.encoder_id, vae_id=models.vae_id, i2v=True,
                             **SETTINGS)
    assert not {s.key for s in ours} & {s.key for s in k5} and not {s.text_key for s in ours} & {s.text_key for s in k5}
    assert {read_safetensors_header(s.latent_path)[1]["family"] for s in ours} == {"some-family"}
    assert [s.fps for s in ours] == [24.0, 24.0, 24.0]
    with pytest.raises(CacheError, match="was made by model family 'some-family'.*never reused"):
        read_text(ours[0].text_path)
    with pytest.raises(CacheError) as err:
        load_cached_dataset(built.ds, cache, encoder_id=models.encoder_id, vae_id=models.vae_id, **SETTINGS)
    assert "3 by model family 'some-family'" in str(err.value)


# ----------------------------------------------------------------------------------------------- interruption


def test_interrupted_runs_leave_complete_files_and_resume(fresh, models, tmp_path):
    cache = tmp_path / "cache"
    ds = scan_folder(fresh)
    seen = []
    with pytest.raises(Stop):
        cache_text(ds, models.encoder, cache, encoder_id=models.encoder_id, check_interrupt=stop_after(2),
                   progress=lambda done, total: seen.append((done, total)))
    with pytest.raises(Stop):
        cache_latents(ds, models.vae, cache, vae_id=models.vae_id, check_interrupt=stop_after(2), **SETTINGS)
    assert seen == [(0, 5), (1, 5), (2, 5)]  # the total first, then after each entry
    assert no_temp_files(cache)
    for sub in ("text", "latents"):
        files = entries(cache / sub)
        assert len(files) == 2
        manifest = json.loads((cache / sub / "manifest.json").read_text())["entries"]
        assert sorted(e["file"] for e in manifest.values()) == [p.name for p in files]
    for path in entries(cache / "text"):
        read_text(path)
    with pytest.raises(CacheError, match="1 latent entries are missing"):
        load_cached_dataset(ds, cache, encoder_id=models.encoder_id, vae_id=models.vae_id, **SETTINGS)

    te, vae = Counting(models.encoder), Counting(models.vae)
    text = cache_text(ds, te, cache, encoder_id=models.encoder_id)
    latents = cache_latents(ds, vae, cache, vae_id=models.vae_id, **SETTINGS)
    assert (text.written, text.skipped, len(te.calls)) == (3, 2, 3)
    assert (latents.written, latents.skipped, vae.calls) == (1, 2, [(1, 3, 1, 48, 80)])  # chelsea, the 3rd clip
    samples = load_cached_dataset(ds, cache, encoder_id=models.encoder_id, vae_id=models.vae_id, **SETTINGS)
    assert all(read_latent(s)["latent"].shape[0] == 16 for s in samples) and len(samples) == 3


# ------------------------------------------------------------------------------------------------- bad input


def noise_video(path: Path, frames: int, keep: float = 1.0) -> None:
    video = torch.rand(frames, 48, 64, 3, generator=torch.Generator().manual_seed(frames))
    data = write_video(video, path.with_suffix(".full.mp4"), fps=24).read_bytes()
    path.with_suffix(".full.mp4").unlink()
    path.write_bytes(data[: int(len(data) * keep)])  # the index is at the front: a cut file still probes
    path.with_suffix(".txt").write_text(path.stem)


def test_bad_files_become_problems_and_good_ones_are_cached(tmp_path, test_data, models):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(test_data["astronaut"], data / "astronaut.png")
    (data / "astronaut.txt").write_text("an astronaut")
    noise_video(data / "short.mp4", 9)
    noise_video(data / "cut.mp4", 33, keep=0.3)  # 33 frames declared, 7 decode
    (data / "broken.mp4").write_bytes(test_data["bbb"].read_bytes()[:200_000])  # BBB's index is at the end
    (data / "broken.txt").write_text("broken")

    ds = scan_folder(data, verify=False)  # the cut file passes a header-only scan and fails when decoded
    seen = []
    report = cache_latents(ds, models.vae, tmp_path / "cache", vae_id=models.vae_id,
                           progress=lambda done, total: seen.append((done, total)), **SETTINGS)
    assert (report.written, report.skipped) == (1, 0) and seen == [(0, 2), (1, 2), (2, 2)]  # astronaut, cut
    assert len(list((tmp_path / "cache" / "latents").glob("*.failed.json"))) == 1
    problems = {p.path.name: p.message for p in report.problems}
    assert set(problems) == {"broken.mp4", "short.mp4", "cut.mp4"}
    assert "too short" in problems["short.mp4"] and "target_frames ≤ 9" in problems["short.mp4"]
    assert "cannot be decoded" in problems["cut.mp4"] and "re-encode" in problems["cut.mp4"]
    summary = report.summary().splitlines()
    assert summary[:2] == ["1 clip: 1 encoded, 0 reused from the cache; 3 files skipped",
                           f"cache: {tmp_path / 'cache'}"]
    assert any(str(data / "cut.mp4") in line and "cannot be decoded" in line for line in summary[2:])
    cache_text(ds, models.encoder, tmp_path / "cache", encoder_id=models.encoder_id)
    samples = load_cached_dataset(ds, tmp_path / "cache", encoder_id=models.encoder_id, vae_id=models.vae_id,
                                  **SETTINGS)
    assert [s.item_id for s in samples] == ["astronaut.png"]  # the cut clip is left out, not "missing"

    (data / "astronaut.png").unlink()
    with pytest.raises(DatasetError) as err:
        cache_latents(scan_folder(data, verify=False), models.vae, tmp_path / "cache", vae_id=models.vae_id,
                      **SETTINGS)
    assert all(name in str(err.value) for name in ("short.mp4", "cut.mp4", "broken.mp4"))
