"""The held-out validation loss of a training run: the training objective on samples the run does not train on, at
fixed σ values and fixed noise, so its curve shows over-fitting without the noise of the training loss.

``validation_loss = mean over held-out samples j and σ_k of loss(sample j, σ_k)``, each term the family adapter's
training loss (:meth:`~cinetune.training.adapter.TrainingAdapter.loss`) of one sample at one σ, with

- caption dropout off and no loss weighting (the plain flow-matching MSE, comparable between runs);
- every random draw of the adapter (noise, image-to-video choice) from a CPU generator seeded with
  ``seed + HOLDOUT_SEED_OFFSET + j`` for each term, so sample j sees the same noise at every σ and at every
  evaluation, and the training generator is never touched (evaluating does not change training, and a resumed run
  reports the same values);
- the model in eval mode (LoRA dropout off) under ``torch.no_grad``; the loop arranges both
  (:func:`cinetune.training.trainer.train_lora`).

The σ values are ``validation_loss_sigmas`` (default 0.1, 0.3, 0.5, 0.7, 0.9).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from .adapter import TrainingAdapter
from .config import TrainConfig

__all__ = ["HOLDOUT_SEED_OFFSET", "heldout_loss"]

#: Added to the run's seed for the held-out noise (so it differs from the training stream of the same seed).
HOLDOUT_SEED_OFFSET = 1_000_003


def heldout_loss(model: nn.Module, adapter: TrainingAdapter, samples: Sequence[Any], config: TrainConfig, *,
                 device: torch.device) -> float:
    """The held-out loss of ``samples`` at ``config.validation_loss_sigmas`` (module notes).

    Args:
        model: the DiT with the current LoRA, in eval mode; call under ``torch.no_grad`` inside the adapter's
            ``running`` context (as the loop does).
        adapter: the family's training adapter. samples: ≥ 1 samples of that family (one micro-batch each).
        config: the run's config (seed, σ values, dtypes, i2v settings). device: where the model runs.

    Returns:
        The mean loss (float).

    Raises:
        ValueError: no samples. TrainingError: a sample the adapter refuses (names it).
    """
    if not samples:
        raise ValueError("heldout_loss needs at least one held-out sample.")
    cfg = dataclasses.replace(config, caption_dropout=0.0, loss_weighting="none")
    generator = torch.Generator()
    total, count = 0.0, 0
    for j, sample in enumerate(samples):
        batch = adapter.load_batch(model, [sample], cfg)
        for sigma in cfg.validation_loss_sigmas:
            generator.manual_seed((config.seed + HOLDOUT_SEED_OFFSET + j) % 2 ** 63)
            terms = adapter.loss(model, batch, torch.tensor([sigma], dtype=torch.float32), generator=generator,
                                 empty=None, config=cfg, device=device)
            total += float(terms.total)
            count += 1
    return total / count
