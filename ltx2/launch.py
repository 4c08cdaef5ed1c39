"""How a headless run of an LTX-2 LoRA is built from its run folder's recipe (the builder
:mod:`cinetune.training.launch` calls; registered when this module is imported, which the launcher does for every
family package that has a ``launch`` module).

The recipe (:mod:`cinetune.training.recipe`) holds what the LTX-2 trainer node used: the DiT file (role ``"dit"``),
the file its text connectors came from (role ``"connectors"``: the Text Encoder Loader's checkpoint, else the DiT's
file) and their dtype (``connectors_dtype``), the loader's ``weight_dtype`` and block-swap settings, the cached
samples and the training settings. The model is loaded as LTX-2 Model Loader loads it (:func:`load_ltx2_dit`), on
the CPU; the launcher places it.
"""

from __future__ import annotations

import torch

from ..training.launch import BuiltRun, register_run_builder, swap_settings
from ..training.recipe import RecipeError, RunRecipe
from ..training.samples import ltx2_empty_text_from_cache, ltx2_samples_from_cache
from .family import LTX2_FAMILY
from .loader import load_ltx2_dit
from .text import load_text_projection
from .train import LTX2TrainingAdapter

__all__ = ["CONNECTOR_DTYPES", "build_ltx2_run"]

#: The dtypes the text connectors may be recorded in (``loader["connectors_dtype"]``).
CONNECTOR_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def build_ltx2_run(recipe: RunRecipe) -> BuiltRun:
    """The model, adapter, samples and settings of an LTX-2 run's recipe.

    Returns:
        :class:`~cinetune.training.launch.BuiltRun`: the DiT (frozen, eval mode, CPU, weights in the recorded
        ``weight_dtype``), an :class:`~cinetune.ltx2.train.LTX2TrainingAdapter` over the text connectors read from
        the ``"connectors"`` file (the DiT's file when the recipe names none) in the recorded dtype (the file's own
        when none is recorded), the samples in recipe order, the empty caption (only when ``caption_dropout`` > 0),
        the held-out samples (when recorded) and the block-swap settings.

    Raises:
        RecipeError: a connectors dtype other than :data:`CONNECTOR_DTYPES`, or settings this version cannot read.
        CheckpointError / CacheError: as the loaders raise them.
    """
    config = recipe.train_config()
    dtype = recipe.loader.get("connectors_dtype")
    if dtype is not None and dtype not in CONNECTOR_DTYPES:
        raise RecipeError(f"the run's recipe gives the text connectors the dtype {dtype!r}; expected one of "
                          f"{', '.join(CONNECTOR_DTYPES)}. Queue the training workflow again to rewrite the recipe.")
    model = load_ltx2_dit(recipe.model_path("dit"), weight_dtype=recipe.loader.get("weight_dtype", "default"),
                          device="cpu").model.eval()
    projection = load_text_projection(recipe.model_path("connectors" if "connectors" in recipe.models else "dit"),
                                      dtype=None if dtype is None else getattr(torch, dtype))
    data = recipe.data["train"]
    empty = ltx2_empty_text_from_cache(data.cache_dir, data.encoder_id) if config.caption_dropout else None
    holdout = ltx2_samples_from_cache(recipe.data["holdout"].samples) if "holdout" in recipe.data else None
    return BuiltRun(model, LTX2TrainingAdapter(projection), ltx2_samples_from_cache(data.samples), empty, config,
                    holdout, **swap_settings(recipe))


register_run_builder(LTX2_FAMILY.name, build_ltx2_run)
