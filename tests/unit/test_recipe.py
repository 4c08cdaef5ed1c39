"""Run recipes: the quick model fingerprint, the recipe written and read back (settings, models, cached samples),
models and caches found after a move, and the errors for foreign, damaged, newer or stale run folders.

The cached datasets here are laid out as the cachers write them (``latents/<key>.safetensors``,
``text/<key>.safetensors``, the empty caption at ``empty_text_path``, the family in the entry metadata) with random
tensors; ``test_launch.py`` trains on them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cinetune.core.checkpoint import save_file_atomic
from cinetune.k5.nabla import NablaConfig
from cinetune.k5.tiny import TINY_DIT_DIMS
from cinetune.ltx2.config import tiny_transformer_metadata
from cinetune.training.cache import DEFAULT_LAYOUT, CachedSample, CacheLayout, empty_text_path
from cinetune.training.config import TrainConfig
from cinetune.training.recipe import (
    RECIPE_FILE,
    CachedData,
    RecipeError,
    RunRecipe,
    file_fingerprint,
    model_fingerprint,
    read_recipe,
    train_config_from_dict,
    write_recipe,
)
from cinetune.training.samples import LTX2_CACHE_LAYOUT

ENCODER_ID = "encoder-test"


def _write_cache(cache_dir: Path, layout: CacheLayout, n: int, seed: int, latent, text) -> CachedData:
    """``n`` samples with the files where the cachers put them; ``latent(g)`` / ``text(g)`` draw their tensors."""
    g = torch.Generator().manual_seed(seed)
    meta = {} if layout.family is None else {"family": layout.family}
    samples = []
    for i in range(n):
        key, text_key = f"{seed:04d}{i:04d}" + "a" * 56, f"{seed:04d}{i:04d}" + "b" * 56
        latent_path = cache_dir / "latents" / f"{key}.safetensors"
        text_path = cache_dir / "text" / f"{text_key}.safetensors"
        tensors = latent(g)
        save_file_atomic(tensors, latent_path, metadata=meta)
        save_file_atomic(text(g), text_path, metadata=meta)
        w, h = tensors["latent"].shape[-1], tensors["latent"].shape[-2]
        factor = 8 if layout.family is None else 32
        frames = (tensors["latent"].shape[1] - 1) * (4 if layout.family is None else 8) + 1
        samples.append(CachedSample(key=key, latent_path=latent_path, text_key=text_key, text_path=text_path,
                                    caption=f"caption {i}", item_id=f"clip{i}.mp4", bucket=(w * factor, h * factor),
                                    frames=frames, kind="video", repeats=1 + i % 2,
                                    template=layout.template or "video", fps=24.0 if layout.family else None,
                                    audio="audio" in tensors, layout=layout))
    empty = empty_text_path(cache_dir, ENCODER_ID, layout=layout)
    save_file_atomic(text(g), empty, metadata=meta)
    return CachedData.from_samples(samples, cache_dir=cache_dir, encoder_id=ENCODER_ID, vae_id="vae-test")


def write_k5_cache(cache_dir: Path, n: int = 3, seed: int = 0) -> CachedData:
    """A Kandinsky 5 cache (default layout): latents ``[16, 2, 4, 4]``, texts ``[3, D]`` with pooled ``[D2]``."""
    D, D2 = TINY_DIT_DIMS["in_text_dim"], TINY_DIT_DIMS["in_text_dim2"]
    return _write_cache(cache_dir, DEFAULT_LAYOUT, n, seed,
                        lambda g: {"latent": torch.randn(16, 2, 4, 4, generator=g)},
                        lambda g: {"text": torch.randn(3, D, generator=g), "pooled": torch.randn(D2, generator=g)})


def write_ltx2_cache(cache_dir: Path, n: int = 3, seed: int = 0) -> CachedData:
    """An LTX-2 cache: latents ``[128, 2, 2, 3]`` with audio ``[8, 5, 16]``, texts ``[6, 24]`` with a mask."""
    D = tiny_transformer_metadata()["caption_channels"]
    return _write_cache(cache_dir, LTX2_CACHE_LAYOUT, n, seed,
                        lambda g: {"latent": torch.randn(128, 2, 2, 3, generator=g),
                                   "audio": torch.randn(8, 5, 16, generator=g)},
                        lambda g: {"text": torch.randn(6, D, generator=g), "text_mask": torch.arange(6) >= 2})


def make_recipe(model: Path, data: CachedData, config: TrainConfig, family: str = "kandinsky-5",
                **models: Path) -> RunRecipe:
    return RunRecipe.create(family, models={"dit": model, **models}, loader={"weight_dtype": "fp32"},
                            data={"train": data}, config=config, validation={"every": 0, "prompts": ["a cat"]},
                            metadata={"cinetune.run": "test", "dataset_hash": "abc"})


@pytest.fixture
def model_file(tmp_path) -> Path:
    """A 9 MiB safetensors file (big enough that the fingerprint samples it)."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "models" / "dit.safetensors"
    save_file_atomic({"a": torch.randn(1024, 1024, generator=g), "b": torch.randn(1280, 1024, generator=g)}, path)
    return path


def _window(path: Path, i: int) -> int:
    """Offset of the i-th sampled 64 KiB window of the data (the documented scheme), plus 100."""
    size = path.stat().st_size
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return header + round(i * (size - header - (1 << 16)) / 31) + 100


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def test_the_fingerprint_follows_content_not_location(model_file, tmp_path):
    fp = file_fingerprint(model_file)
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copy(model_file, copy)
    assert file_fingerprint(copy) == fp
    # a weight byte in the first MiB, one in a sampled window in the middle, the last byte, a header byte
    for offset in (_window(model_file, 0), _window(model_file, 15), model_file.stat().st_size - 1, 20):
        changed = tmp_path / f"changed_{offset}.safetensors"
        shutil.copy(model_file, changed)
        _flip(changed, offset)
        assert file_fingerprint(changed) != fp, offset
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(model_file.read_bytes() + b"\0")
    assert file_fingerprint(longer) != fp


def test_small_and_sharded_models_are_fingerprinted_whole(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(1000))
    fp = file_fingerprint(small)
    _flip(small, 500)
    assert file_fingerprint(small) != fp
    folder = tmp_path / "snapshot"
    save_file_atomic({"x": torch.zeros(4)}, folder / "model-00001-of-00002.safetensors")
    save_file_atomic({"y": torch.ones(4)}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    size, whole = model_fingerprint(folder / "model-00001-of-00002.safetensors")
    assert (size, whole) == model_fingerprint(folder)  # a shard stands for its whole snapshot
    assert size == sum(p.stat().st_size for p in folder.iterdir())
    save_file_atomic({"y": torch.full((4,), 2.0)}, folder / "model-00002-of-00002.safetensors")  # the other shard
    assert model_fingerprint(folder / "model-00001-of-00002.safetensors")[1] != whole


# ---------------------------------------------------------------------------------------------------------------
# Writing and reading


def test_a_recipe_reads_back_as_written(model_file, tmp_path):
    data = write_k5_cache(tmp_path / "cache")
    config = TrainConfig(rank=8, alpha=4.0, targets=("to_query",), betas=(0.8, 0.9), nabla=NablaConfig(P=0.8),
                         compute_dtype="fp32", seed=7, caption_dropout=0.1, lr_schedule="cosine", min_lr_ratio=0.1,
                         lora_include=(r"visual_transformer_blocks\.0\.",), sigma_min=0.1, loss_weighting="cosmap",
                         validation_loss_sigmas=(0.2, 0.6))
    recipe = make_recipe(model_file, data, config)
    path = write_recipe(tmp_path / "run", recipe)
    assert path == tmp_path / "run" / RECIPE_FILE and not list((tmp_path / "run").glob(".*"))
    back = read_recipe(tmp_path / "run")
    assert back == recipe and back.seed == 7
    assert back.train_config(nabla_type=NablaConfig) == config
    assert [s for s in back.data["train"].samples] == list(data.samples)
    on_disk = json.loads(path.read_text())
    assert on_disk["data"]["train"]["samples"][0]["latent"].startswith("latents/")  # relative to the cache folder
    assert on_disk["config"] == config.to_dict() and on_disk["validation"] == {"every": 0, "prompts": ["a cat"]}


def test_training_settings_refuse_what_does_not_read_back():
    d = TrainConfig(nabla=NablaConfig()).to_dict()
    with pytest.raises(RecipeError, match="NABLA"):
        train_config_from_dict(d)
    with pytest.raises(RecipeError, match="does not know \\(warp_factor\\).*newer Cinetune"):
        train_config_from_dict({**TrainConfig().to_dict(), "warp_factor": 9})
    with pytest.raises(RecipeError, match="invalid.*rank"):
        train_config_from_dict({**TrainConfig().to_dict(), "rank": 0})
    with pytest.raises(RecipeError, match="do not read back.*compute_dtype"):
        train_config_from_dict({**TrainConfig().to_dict(), "compute_dtype": "fp32"})  # to_dict writes "float32"


def test_moved_models_are_found_by_fingerprint(model_file, tmp_path):
    recipe = make_recipe(model_file, write_k5_cache(tmp_path / "cache"), TrainConfig())
    write_recipe(tmp_path / "run", recipe)
    store = tmp_path / "store" / "diffusion_models"
    store.mkdir(parents=True)
    decoy = store.parent / "other" / "dit.safetensors"  # same name, other content: passed over
    decoy.parent.mkdir()
    save_file_atomic({"a": torch.zeros(3)}, decoy)
    shutil.move(model_file, store / "dit.safetensors")
    with pytest.raises(RecipeError, match=r"dit model .* is not there.*--models <folder>.*--model dit=<file>"):
        read_recipe(tmp_path / "run")
    found = read_recipe(tmp_path / "run", models=tmp_path / "store")
    assert found.model_path("dit") == (store / "dit.safetensors").absolute()
    assert read_recipe(tmp_path / "run", models={"dit": store / "dit.safetensors"}).model_path("dit") == \
        found.model_path("dit")
    assert read_recipe(tmp_path / "run", check_models=False).model_path("dit") == model_file.absolute()


def test_a_changed_model_file_is_refused(model_file, tmp_path):
    write_recipe(tmp_path / "run", make_recipe(model_file, write_k5_cache(tmp_path / "cache"), TrainConfig()))
    _flip(model_file, _window(model_file, 16))
    with pytest.raises(RecipeError, match=r"dit model .* has changed.*other content.*put the original file back"):
        read_recipe(tmp_path / "run")
    with pytest.raises(RecipeError, match="has changed"):
        read_recipe(tmp_path / "run", models={"dit": model_file})


def test_moved_caches_are_followed_and_missing_entries_named(model_file, tmp_path):
    data = write_k5_cache(tmp_path / "cache")
    write_recipe(tmp_path / "run", make_recipe(model_file, data, TrainConfig()))
    os.replace(tmp_path / "cache", tmp_path / "moved")
    with pytest.raises(RecipeError, match=r"(?s)6 cache entries of the run's train data are missing.*--cache"):
        read_recipe(tmp_path / "run")
    moved = read_recipe(tmp_path / "run", caches={str(tmp_path / "cache"): tmp_path / "moved"}).data["train"]
    assert moved.cache_dir == tmp_path / "moved" and moved.samples[1].text_path.parent == tmp_path / "moved" / "text"
    assert moved.samples[1].latent_path.read_bytes() == (tmp_path / "moved" / "latents" /
                                                         data.samples[1].latent_path.name).read_bytes()


def test_foreign_damaged_and_newer_run_folders_are_refused(model_file, tmp_path):
    with pytest.raises(RecipeError, match="is not a folder"):
        read_recipe(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no recipe.json: it is not a Cinetune training run folder"):
        read_recipe(tmp_path / "empty")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text("{}")
    with pytest.raises(RecipeError, match="before run folders kept their recipe.*resume on"):
        read_recipe(tmp_path / "old")
    run = tmp_path / "run"
    write_recipe(run, make_recipe(model_file, write_k5_cache(tmp_path / "cache"), TrainConfig()))
    good = json.loads((run / RECIPE_FILE).read_text())
    cases = [("{not json", "cannot be read"), (json.dumps([1]), "not a Cinetune run recipe"),
             (json.dumps({**good, "format": "other"}), "not a Cinetune run recipe"),
             (json.dumps({**good, "version": 99}), "newer Cinetune .*version 99"),
             (json.dumps({**good, "models": []}), "damaged: 'models' must be a JSON dict"),
             (json.dumps({**good, "data": {"train": {"cache_dir": "x"}}}), "damaged \\(KeyError")]
    for text, message in cases:
        (run / RECIPE_FILE).write_text(text)
        with pytest.raises(RecipeError, match=message):
            read_recipe(run)


def test_create_checks_what_it_records(model_file, tmp_path):
    data = write_k5_cache(tmp_path / "cache")
    with pytest.raises(RecipeError, match="dit model file .* does not exist"):
        make_recipe(tmp_path / "missing.safetensors", data, TrainConfig())
    with pytest.raises(RecipeError, match="plain JSON"):
        RunRecipe.create("kandinsky-5", models={"dit": model_file}, loader={"dtype": torch.float16},
                         data={"train": data}, config=TrainConfig())
    other = write_ltx2_cache(tmp_path / "ltx2_cache")
    with pytest.raises(RecipeError, match="several model families"):
        CachedData.from_samples([*data.samples, *other.samples], cache_dir=tmp_path, encoder_id=ENCODER_ID)
