"""The training adapter contract: what a model family hands the shared LoRA training loop.

The loop (:func:`cinetune.training.trainer.train_lora`) owns optimizers, LR schedules, σ sampling, gradient
accumulation and clipping, gradient checkpointing over the adapter's blocks, checkpoints, exact resume, interrupts,
events and validation; it never looks inside the model. Everything that differs between families lives in one
:class:`TrainingAdapter` per family (``k5/train.py``, ``ltx2/train.py``), as Lightricks/LTX-2 ltx-trainer's
``training_strategies`` and diffusers' ``_repeated_blocks`` keep model knowledge out of their loops:

==========================  ==========================================================================================
adapter                     what the family decides
==========================  ==========================================================================================
``name``                    the family (:attr:`cinetune.core.family.ModelFamily.name`), for messages
``sample_fields``           the tensors/values a sample of this family carries besides the loop's own fields
``accepts(model)``          whether ``model`` is this family's DiT (picks the adapter when none is passed)
``check(model, config)``    refuse a model/config pair that cannot train (options the family has no use for)
``lora_targets(config)``    Linear-name suffixes that get LoRA; ``lora_within``: the block prefixes they live under
``blocks(model)``           the blocks in execution order: checkpointed by the loop, swapped by the caller
``fp8_keep(name)``          the fp8 keep-in-high-precision rule for loading the base weights to train on
``empty_caption(...)``      the checked empty-caption embedding for caption dropout
``load_batch(...)``         one micro-batch of samples → checked CPU tensors (:class:`Batch`); preflight uses it too
``loss(...)``               the micro-batch's noise, conditioning, DiT inputs, forward and loss (:class:`LossTerms`)
``running(...)``            a context for the run: frozen helpers on the device, model attributes set and restored
``save_lora(...)``          how the final LoRA file is written (the family's interoperable layout)
==========================  ==========================================================================================

Calls per micro-batch, in order: ``batch = load_batch(model, samples, config)``, then the loop draws the σ of
every sample from the run's generator (:func:`cinetune.training.sigmas.sample_sigmas`, with ``batch.tokens`` for
the token-count shift, mapped into ``[sigma_min, sigma_max]``) and, when a LoRA dropout is on, one seed for the
global RNG the dropout uses, then ``loss(model, batch, sigma, …)`` draws everything else it needs from the same
generator, in an order it documents, so runs are reproducible and resume exactly. ``loss`` applies
``config.loss_weighting`` to each sample's squared error (:func:`cinetune.training.sigmas.weighted_mse`). The
held-out loss (:mod:`cinetune.training.holdout`) calls ``load_batch`` and ``loss`` the same way, with its own
generator, in eval mode under ``torch.no_grad``.

:func:`gradient_checkpointing` and the adapter registry (:func:`register_training_adapter`,
:func:`training_adapter_for`) live here too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core.lora import LoRALinear, LoRAWeights, save_lora
from .config import TrainConfig, TrainingError

__all__ = ["Batch", "LossTerms", "TrainingAdapter", "register_training_adapter", "registered_training_adapters",
           "training_adapter_for", "gradient_checkpointing", "sample_tensor"]


class Batch(Protocol):
    """What the loop reads from an adapter's micro-batch (the rest is the adapter's own).

    Attributes:
        size: B, the number of samples.
        tokens: video tokens per sample after patchifying (all samples of a batch share their latent shape); the
            ``"shifted_logit_normal"`` σ sampler shifts by it.
    """

    size: int
    tokens: int


@dataclass
class LossTerms:
    """The loss of one micro-batch.

    Attributes:
        total: 0-dim float32 tensor, differentiable w.r.t. the LoRA parameters; what the loop back-propagates.
        parts: the named parts of ``total`` as detached 0-dim tensors (e.g. ``{"video": …, "audio": …}``), reported
            in :class:`~cinetune.training.config.TrainEvent` ``loss_terms``; empty when the loss has one part.
    """

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class TrainingAdapter(ABC):
    """One model family's side of LoRA training (the contract is in the module notes).

    Subclasses set :attr:`name`, :attr:`sample_fields` and :attr:`lora_within`, and implement the abstract methods.
    The defaults of :meth:`running` (nothing to do) and :meth:`save_lora` (Cinetune/ComfyUI layout with ``.alpha``,
    :func:`cinetune.core.lora_formats.save_lora`) fit families that need nothing else.

    Attributes:
        name: the family's name (``"kandinsky-5"``, ``"ltx-2"``).
        sample_fields: attributes every sample must have besides ``bucket``, ``frames``, ``item_id`` (checked
            without reading them, so cached samples are not loaded early).
        lora_within: module-name prefixes the LoRA targets live under (the block stacks); None = anywhere.
    """

    name: str = ""
    sample_fields: tuple[str, ...] = ()
    lora_within: tuple[str, ...] | None = None

    @abstractmethod
    def accepts(self, model: nn.Module) -> bool:
        """Whether ``model`` is a DiT of this family."""

    @abstractmethod
    def check(self, model: nn.Module, config: TrainConfig) -> None:
        """Raise :class:`~cinetune.training.config.TrainingError` when ``model`` cannot be trained with ``config``
        (wrong model, options the family does not support), saying how to fix it."""

    @abstractmethod
    def lora_targets(self, config: TrainConfig) -> tuple[str, ...]:
        """The Linear-name suffixes that get LoRA layers: ``config.targets`` when set, else the family's default
        for this config."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's transformer blocks in execution order (gradient checkpointing, block swap)."""

    @abstractmethod
    def fp8_keep(self, name: str) -> bool:
        """True when the Linear at module path ``name`` stays in high precision when the base weights are fp8 (the
        rule the family's loader quantises with; pass it to :func:`cinetune.core.quant.quantize_linear_weights_fp8`)."""

    @abstractmethod
    def empty_caption(self, model: nn.Module, empty_text: Any, config: TrainConfig) -> Any:
        """The checked empty-caption embedding(s) for caption dropout, None when ``config.caption_dropout`` is 0.

        Raises:
            TrainingError: needed but missing or of the wrong form (the message gives the expected form).
        """

    @abstractmethod
    def load_batch(self, model: nn.Module, samples: Sequence[Any], config: TrainConfig) -> Batch:
        """Read and check one micro-batch (samples of one bucket and frame count) into CPU tensors.

        Raises:
            TrainingError: a sample is missing a tensor or has the wrong shape (names the sample and the fix).
        """

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, sigma: Tensor, *, generator: torch.Generator, empty: Any,
             config: TrainConfig, device: torch.device, share: slice | None = None) -> LossTerms:
        """The training loss of one micro-batch at the sampled ``sigma`` (``[B]`` float32, CPU).

        Draws noise and the conditioning/dropout decisions from ``generator`` (CPU) in a documented order, builds the
        DiT's inputs on ``device`` in ``config.compute_dtype``, runs the forward with grad enabled and returns the
        float32 loss. ``empty`` is what :meth:`empty_caption` returned.

        ``share`` (data-parallel runs, :mod:`cinetune.training.distributed`): draw everything for the whole batch
        exactly as without it, then run the DiT on ``batch[share]`` only and return that share's part of the
        batch's loss (and of each part): the parts of the shares of a partition sum to the whole batch's loss.
        """

    def running(self, model: nn.Module, config: TrainConfig, device: torch.device) -> ContextManager[None]:
        """A context open for the whole run (after LoRA injection): put the family's frozen helpers on ``device``,
        set model attributes the forward reads, and restore everything on exit. Default: nothing."""
        return nullcontext()

    def save_lora(self, path: Path, modules: LoRAWeights | Mapping[str, LoRALinear], *, dtype: torch.dtype,
                  metadata: Mapping[str, str]) -> Path:
        """Write the final LoRA (``run_dir/lora.safetensors``) or its weight EMA (``lora_ema.safetensors``, given as
        :class:`~cinetune.core.lora.LoRAWeights`). Default: ``diffusion_model.<path>.lora_down/lora_up.weight`` +
        ``.alpha`` (:func:`cinetune.core.lora_formats.save_lora`). Checkpoint LoRAs always use that layout (in
        ``lora_dtype``), so resuming restores the exact tensors."""
        return save_lora(path, modules, dtype=dtype, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# Registry

_ADAPTERS: dict[str, TrainingAdapter] = {}


def register_training_adapter(adapter: TrainingAdapter) -> TrainingAdapter:
    """Make a family's adapter known to :func:`training_adapter_for` (called once by the family's ``train``
    module on import; registering the same name again replaces it). Returns ``adapter``.

    Raises:
        TypeError: not a :class:`TrainingAdapter`. ValueError: empty name.
    """
    if not isinstance(adapter, TrainingAdapter):
        raise TypeError(f"register_training_adapter takes a TrainingAdapter, got {type(adapter).__name__}")
    if not adapter.name:
        raise ValueError(f"{type(adapter).__name__} has no name (the model family's name)")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def registered_training_adapters() -> tuple[TrainingAdapter, ...]:
    """The registered adapters in registration order."""
    return tuple(_ADAPTERS.values())


def training_adapter_for(model: nn.Module) -> TrainingAdapter:
    """The registered adapter that accepts ``model``.

    Raises:
        TrainingError: none does; the message lists the registered ones and says to import the family's ``train``
            module (e.g. ``cinetune.k5.train``) or pass the adapter.
    """
    for adapter in _ADAPTERS.values():
        if adapter.accepts(model):
            return adapter
    known = ", ".join(_ADAPTERS) or "none"
    raise TrainingError(f"No training adapter accepts a {type(model).__name__} (registered: {known}). Import the "
                        "model family's training module (cinetune.k5.train, cinetune.ltx2.train) or pass "
                        "adapter= to train_lora.")


# ---------------------------------------------------------------------------------------------------------------
# Pieces the adapters share


def sample_tensor(sample: Any, name: str, required: bool) -> Tensor | None:
    """``sample.<name>`` checked to be a float tensor (None allowed unless ``required``).

    Raises:
        TrainingError: missing when required, or not a float tensor (names the sample).
    """
    t = getattr(sample, name, None)
    if t is None and required:
        raise TrainingError(f"sample {getattr(sample, 'item_id', '?')!r} has no {name!r} tensor.")
    if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
        raise TrainingError(f"sample {getattr(sample, 'item_id', '?')!r}: {name} must be a float tensor, got "
                            f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}.")
    return t


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """A subclass of ``cls`` whose call (hooks and forward) runs under ``torch.utils.checkpoint``."""
    if cls not in _CHECKPOINTED:
        def __call__(self, *args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(cls.__call__, self, *args, use_reentrant=False, **kwargs)
            return cls.__call__(self, *args, **kwargs)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__,
                                                                           "__module__": __name__})
    return _CHECKPOINTED[cls]


@contextmanager
def gradient_checkpointing(blocks: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Checkpoint every block of ``blocks`` (an adapter's :meth:`~TrainingAdapter.blocks`) while the context is
    open: activations inside a block are recomputed in backward; only block inputs are kept.

    Each block keeps its identity, names and parameters; only its class is swapped for a subclass whose ``__call__``
    runs ``checkpoint(block.__call__, …, use_reentrant=False)`` when grad is enabled (so forward hooks, e.g. block
    swap, run inside the recomputation too), and restored on exit. Gradients equal those without checkpointing.
    One checkpoint per block is the official granularity of both families' trainers (kandinskylab, musubi-tuner,
    Lightricks/LTX-2 ltx-trainer).

    Raises:
        TrainingError: ``blocks`` is a whole model, is empty, or holds something that is not an ``nn.Module``.
    """
    if not enabled:
        yield
        return
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TrainingError(f"gradient_checkpointing takes the model's blocks (the training adapter's "
                            f"blocks(model)), not the {type(blocks).__name__} itself.")
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise TrainingError("gradient checkpointing needs the model's transformer blocks (the training adapter's "
                            "blocks(model)); got none. Turn gradient_checkpointing off for other models.")
    swapped = []
    try:
        for block in blocks:
            cls = type(block)
            if cls in _CHECKPOINTED.values():
                continue
            block.__class__ = _checkpointed_class(cls)
            swapped.append((block, cls))
        yield
    finally:
        for block, cls in swapped:
            block.__class__ = cls

