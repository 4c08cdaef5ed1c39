"""The epoch plan of a training run: which samples form each batch, in which order (the rules are the
:mod:`cinetune.training.trainer` notes, "Epochs and batches")."""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch

__all__ = ["plan_epoch", "batches_per_epoch"]


def plan_epoch(keys: Sequence[Hashable], repeats: Sequence[int], batch_size: int,
               generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches of sample indices (algorithm in the :mod:`cinetune.training.trainer` notes, "Epochs and
    batches").

    Args:
        keys: per sample, its group (bucket, frames): only equal keys share a batch.
        repeats: per sample, how often it appears in the epoch (≥ 1).
        batch_size: ≥ 1. generator: CPU generator (one ``randperm`` of the repeated list).

    Returns:
        Batches (lists of indices into ``keys``) in training order; full batches in the order they fill up, then the
        partial ones in the order of their first sample.
    """
    repeated = [i for i, r in enumerate(repeats) for _ in range(r)]
    order = torch.randperm(len(repeated), generator=generator).tolist()
    pending: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []
    for p in order:
        i = repeated[p]
        group = pending.setdefault(keys[i], [])
        group.append(i)
        if len(group) == batch_size:
            batches.append(pending.pop(keys[i]))
    batches.extend(pending.values())
    return batches


def batches_per_epoch(keys: Sequence[Hashable], repeats: Sequence[int], batch_size: int) -> int:
    """The number of batches :func:`plan_epoch` makes (the same for every epoch): per group, ceil(samples × repeats
    / batch_size)."""
    counts: dict[Hashable, int] = {}
    for k, r in zip(keys, repeats):
        counts[k] = counts.get(k, 0) + r
    return sum(math.ceil(n / batch_size) for n in counts.values())
