"""What the model handles of both families share: where a model runs (block swap, pinned memory, offload device)
and adding a LoRA for sampling."""

from __future__ import annotations

from dataclasses import replace

from ..core.lora import check_lora_fits
from ..core.lora_formats import load_lora
from . import host


class PlacedModel:
    """Mixin for a handle dataclass with ``model``, ``blocks`` (execution order), ``blocks_to_swap``,
    ``use_pinned_memory``, ``loras`` (``(name, weights, strength)`` applied unmerged while sampling), ``path``,
    ``variant``, ``attention_backend`` and ``weight_dtype``."""

    def loader_settings(self) -> dict:
        """The loader settings a training run's recipe records (plain JSON values): ``weight_dtype``, ``attention``,
        ``variant`` (its id), ``blocks_to_swap``, ``use_pinned_memory``."""
        return {"weight_dtype": self.weight_dtype, "attention": self.attention_backend, "variant": self.variant.id,
                "blocks_to_swap": self.blocks_to_swap, "use_pinned_memory": self.use_pinned_memory}

    def placement(self) -> dict:
        """Keyword arguments of :func:`~cinetune.core.offload.model_on_device` for this model: its block swap,
        pinned host memory only where it helps (a CUDA device; ``None`` lets the swap decide), ComfyUI's offload
        device."""
        return dict(blocks_to_swap=self.blocks_to_swap, pin_memory=None if self.use_pinned_memory else False,
                    offload_device=host.offload_device())

    def with_lora(self, lora_name: str, strength: float):
        """A copy of the handle with the LoRA file ``lora_name`` (models/loras) added; the shared base weights never
        change.

        Raises:
            LoRAError: the file is not a LoRA for this model (names the file and the first layer that does not fit).
        """
        names = [name for name, _ in self.model.named_modules()]
        weights = load_lora(host.model_path("loras", lora_name), module_names=names)
        check_lora_fits(self.model, weights, lora_name)
        return replace(self, loras=(*self.loras, (lora_name, weights, strength)))
