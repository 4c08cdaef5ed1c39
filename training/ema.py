"""Exponential moving average (EMA) of the LoRA weights of a training run.

After every optimizer step ``ema ← d·ema + (1 − d)·lora`` for every ``lora_down`` and ``lora_up``, with the decay d
= :attr:`~cinetune.training.config.TrainConfig.ema_decay` (Polyak & Juditsky 1992; the "EMA of weights" of
kohya-ss sd-scripts/SimpleTuner and diffusers ``training_utils.EMAModel`` without its decay warm-up). The average
starts at the run's initial LoRA (step 0: the fresh or ``init_lora`` weights), is kept in float32 on the LoRA's
device, is saved in every checkpoint (so a resumed run continues it exactly) and is written at the end as a second
LoRA file by the family's adapter (``run_dir/lora_ema.safetensors``).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..core.lora import LoRALinear, LoRAWeights
from .config import ResumeError

__all__ = ["LoRAEMA", "EMA_LORA_FILE"]

#: File name of the EMA LoRA in the run folder.
EMA_LORA_FILE = "lora_ema.safetensors"


class LoRAEMA:
    """The EMA of the LoRA layers ``modules`` (module notes).

    Args:
        modules: ``{module_path: LoRALinear}`` of :func:`cinetune.core.lora.inject_lora` (on their training device).
        decay: d in (0, 1).

    Raises:
        ValueError: decay outside (0, 1).
    """

    def __init__(self, modules: Mapping[str, LoRALinear], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), e.g. 0.999; got {decay!r}.")
        self.decay = float(decay)
        self.modules = dict(modules)
        self.average: dict[str, tuple[Tensor, Tensor]] = {
            path: (m.lora_down.detach().float().clone(), m.lora_up.detach().float().clone())
            for path, m in self.modules.items()}

    @torch.no_grad()
    def update(self) -> None:
        """``ema ← d·ema + (1 − d)·lora`` for every tensor (call after each optimizer step)."""
        d = self.decay
        for path, m in self.modules.items():
            for avg, p in zip(self.average[path], (m.lora_down, m.lora_up)):
                avg.mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    def state_dict(self) -> dict[str, Tensor]:
        """``{"<path>.lora_down": [r, in], "<path>.lora_up": [out, r]}`` float32 (``weights_only``-loadable)."""
        out = {}
        for path, (down, up) in self.average.items():
            out[f"{path}.lora_down"], out[f"{path}.lora_up"] = down, up
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Continue from :meth:`state_dict` of a checkpoint.

        Raises:
            ResumeError: a layer is missing or has another shape (the checkpoint is damaged or of another run).
        """
        for path, (down, up) in self.average.items():
            for avg, key in ((down, f"{path}.lora_down"), (up, f"{path}.lora_up")):
                saved = state.get(key)
                if not isinstance(saved, Tensor) or saved.shape != avg.shape:
                    raise ResumeError(f"The checkpoint's LoRA EMA lacks {key} or has another shape; delete the "
                                      "checkpoint folder to resume from the previous one, or start a new run folder.")
                avg.copy_(saved)

    def weights(self) -> LoRAWeights:
        """The averaged LoRA as :class:`~cinetune.core.lora.LoRAWeights` (the modules' alphas), for saving."""
        return LoRAWeights({path: (down, up, float(self.modules[path].alpha))
                            for path, (down, up) in self.average.items()}, "modules")
