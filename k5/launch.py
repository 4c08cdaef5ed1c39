"""How a headless run of a Kandinsky 5 LoRA is built from its run folder's recipe (the builder
:mod:`cinetune.training.launch` calls; registered when this module is imported, which the launcher does for every
family package that has a ``launch`` module).

The recipe (:mod:`cinetune.training.recipe`) holds what the K5 trainer node used: the DiT file (role ``"dit"``), the
loader's ``weight_dtype`` and block-swap settings, the cached samples and empty caption of the text cache, and the
training settings, NABLA among them. The model is loaded as K5 Model Loader loads it (:func:`load_k5_dit`), on the
CPU; the launcher places it.
"""

from __future__ import annotations

from ..training.launch import BuiltRun, register_run_builder, swap_settings
from ..training.recipe import RunRecipe
from ..training.samples import empty_texts_from_cache, samples_from_cache
from .dit import load_k5_dit
from .family import K5_FAMILY
from .nabla import NablaConfig
from .train import K5_TRAINING

__all__ = ["build_k5_run"]


def build_k5_run(recipe: RunRecipe) -> BuiltRun:
    """The model, adapter, samples and settings of a Kandinsky 5 run's recipe.

    Returns:
        :class:`~cinetune.training.launch.BuiltRun`: the DiT (frozen, eval mode, CPU, weights in the recorded
        ``weight_dtype``), :data:`~cinetune.k5.train.K5_TRAINING`, the training samples in recipe order, the empty
        captions by template (only when ``caption_dropout`` > 0), the held-out samples (when recorded) and the
        block-swap settings.

    Raises:
        RecipeError: settings this version cannot read. CheckpointError / CacheError: as the loaders raise them.
    """
    config = recipe.train_config(nabla_type=NablaConfig)
    model = load_k5_dit(recipe.model_path("dit"), weight_dtype=recipe.loader.get("weight_dtype", "default"),
                        device="cpu").model.eval()
    data = recipe.data["train"]
    cached = list(data.samples)
    empty = empty_texts_from_cache(cached, data.cache_dir, data.encoder_id) if config.caption_dropout else None
    holdout = samples_from_cache(recipe.data["holdout"].samples) if "holdout" in recipe.data else None
    return BuiltRun(model, K5_TRAINING, samples_from_cache(cached), empty, config, holdout, **swap_settings(recipe))


register_run_builder(K5_FAMILY.name, build_k5_run)
