"""The LoRA training loop, one for every model family: one call runs (or resumes) a whole run.

::

    from cinetune.k5.train import K5_TRAINING                       # or LTX2TrainingAdapter(text_projection)
    samples = samples_from_cache(load_cached_dataset(...))          # or K5Sample(...) / LTX2Sample(...) objects
    result = train_lora(dit, samples, empty, TrainConfig(rank=16, max_steps=2000), "runs/my_lora",
                        adapter=K5_TRAINING, device="cuda", resume=True, on_event=print,
                        check_interrupt=host.check_interrupt)
    result.lora_path   # runs/my_lora/lora.safetensors, loads in ComfyUI's LoraLoaderModelOnly

The loop knows no model: the family's training adapter (:mod:`cinetune.training.adapter`) says which layers get
LoRA, which blocks are checkpointed, how a sample becomes the DiT's inputs and what the loss is (objectives:
:mod:`cinetune.k5.train`, :mod:`cinetune.ltx2.train`). Files and resume: :mod:`cinetune.training.checkpointing`;
settings: :mod:`cinetune.training.config`; σ: :mod:`cinetune.training.sigmas`.

Decisions (where the sources leave a choice):

- **Randomness.** Everything random — LoRA init (kaiming-uniform of ``lora_down``, in module order), the epoch
  orders, σ, noise and the adapter's conditioning and caption-dropout draws — comes from one CPU
  ``torch.Generator`` seeded with ``config.seed`` and saved in every checkpoint, so a run is reproducible on any
  device and a resumed run continues exactly. Per micro-batch the loop draws B σ (after the adapter has loaded the
  batch), then — only when a LoRA dropout is on — one integer that seeds the global torch RNG (LoRA dropout draws
  from it, and ``torch.utils.checkpoint`` restores it for the recomputation, so the masks match in backward), then
  the adapter draws the rest in its documented order (without dropout there is no such draw, and the global RNG is
  not used). The global torch/NumPy/Python RNG states are saved and restored too.
- **Epochs and batches.** An epoch is one pass over the *repeated* sample list (sample i listed ``repeats`` times).
  Its order is a ``torch.randperm`` of that list; walking it, samples go into one pending batch per (bucket,
  frames) and a batch is emitted when it holds ``batch_size`` samples, so a batch never mixes sizes. Leftover partial
  batches are emitted at the end of the epoch (every sample is seen once per repeat per epoch). An optimizer step
  accumulates the next ``grad_accum`` batches of the current epoch; the last step of an epoch may have fewer (the
  window never crosses an epoch). Each micro-batch weighs equally (its loss / number of micro-batches in the
  window, as accelerate/kohya). With ``epochs > 0`` the run has ``epochs × ceil(batches per epoch / grad_accum)``
  steps and ``max_steps`` is ignored.
- **Interrupt and errors.** ``check_interrupt()`` runs before every optimizer step. When it — or anything else in
  the loop (validation, an event handler, a non-finite loss, out-of-memory) — raises, the last consistent state is
  saved as a resumable checkpoint (the LoRA and optimizer as after the last finished step, the generator as
  before the failed one) and as ``run_dir/lora.safetensors``; then the caller's exception is re-raised unchanged
  (so ComfyUI's own interrupt exception reaches ComfyUI), with a note naming the checkpoint. An exception inside
  ``optimizer.step()`` itself saves nothing (the parameters may be half-updated); the previous checkpoint stays.
  A non-finite loss or gradient norm raises :class:`TrainingError` before the update.
- **Checkpoints** (layout in :mod:`~cinetune.training.checkpointing`): written every ``save_every`` steps, at the
  last step of every ``save_every_epochs``-th epoch and at the end; the newest ``keep_checkpoints`` are kept (0 keeps
  all). The final LoRA ``run_dir/lora.safetensors`` is written by the adapter
  (:meth:`~cinetune.training.adapter.TrainingAdapter.save_lora`) in ``save_dtype`` (bf16 by default) at the end and
  at an interruption (then with metadata ``cinetune.complete = "false"``); with ``ema_decay`` > 0 also
  ``run_dir/lora_ema.safetensors`` (:mod:`~cinetune.training.ema`). A schedule-free optimizer's files hold its
  evaluation weights (:func:`~cinetune.training.schedules.evaluation_weights`); its train-mode weights ride in the
  checkpoint's state for an exact resume.
- **LoRA start**: ``init_lora`` is copied into the fresh LoRA layers right after injection
  (:func:`cinetune.core.lora.init_lora_from_file`) on a new run only: a resumed run takes its checkpoint's weights
  and does not read that file again.
- **Resume.** ``resume=True`` continues from the newest checkpoint in ``run_dir`` (a fresh start when there is
  none); a path resumes from that checkpoint folder or run folder. ``resume=False`` on a folder that already holds
  checkpoints raises instead of overwriting them. The resumed run takes learning rate, schedule and step count from
  the *current* config (so a run can be extended); rank, alpha, targets, model and optimizer type must match the
  checkpoint (:class:`ResumeError` says which and how to fix it). If the sample list changed, the saved epoch order
  is dropped and a new epoch begins (a warning says so).
- **Gradient checkpointing** wraps each of the adapter's blocks (:func:`gradient_checkpointing`). **Block swap** is
  the caller's: ``cinetune.core.offload.model_on_device(model, adapter.blocks(model), …)`` around this call (the
  LoRA parameters are moved to ``device`` and never swapped).
- **The model is restored** on return, success or not: LoRA layers removed, block classes, ``requires_grad`` flags
  and train/eval mode as before (and whatever the adapter's ``running`` context sets). Training runs with
  ``torch.inference_mode(False)`` and grad enabled (ComfyUI executes nodes in inference mode); the model's weights
  must not be inference tensors.
- **Evaluation** (the ``validate`` callback, the held-out loss of :mod:`~cinetune.training.holdout` every
  ``validation_loss_every`` steps and at the last step): model in eval mode, ``torch.no_grad``, schedule-free
  evaluation weights; nothing of it touches the run's generator, so it never changes the training.
- **Events** and TensorBoard (:mod:`~cinetune.training.tb_log`, ``tensorboard=True``): ``grad_norm`` is the global
  L2 norm of the LoRA gradients before clipping (``max_grad_norm`` clips only when > 0); ``checkpoint`` names the
  checkpoint written at the step. ``loss_ema`` is the bias-corrected exponential moving average of the step losses,
  ``m_n = β·m_{n−1} + (1 − β)·loss_n``, ``m_0 = 0``, reported as ``m_n / (1 − βⁿ)`` with β = 0.9 (Kingma & Ba 2015,
  arXiv:1412.6980 §3) over the whole run, resumed runs included (so the first value is the first loss).
  ``loss_terms`` are the adapter's named loss parts (e.g. LTX-2 video and audio) of the step.
  ``steps_per_s`` is the steps of this call over its wall time so far, ``eta_s`` the remaining steps at that rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.attention import check_backend
from ..core.checkpoint import write_json_atomic
from ..core.family import get_family
from ..core.lora import LoRALinear, init_lora_from_file, inject_lora, load_lora, remove_lora, save_lora
from .adapter import LossTerms, TrainingAdapter, gradient_checkpointing, training_adapter_for
from .checkpointing import (CHECKPOINTS_DIR, LORA_FILE, RUN_FILE, STATE_FORMAT, check_fingerprint, global_rng_state,
                            list_checkpoints, metadata_strings, read_state, remove_leftovers, resolve_resume,
                            set_global_rng_state, write_checkpoint)
from .config import (I2V_MODES, TIMESTEP_SAMPLING, ResumeError, TrainConfig, TrainEvent, TrainingError, TrainResult,
                     check_int)
from .ema import EMA_LORA_FILE, LoRAEMA
from .epochs import batches_per_epoch, plan_epoch
from .distributed import SINGLE_PROCESS, DistributedContext, check_world_divides
from .holdout import heldout_loss
from .samples import CachedTrainSample, TrainSample, empty_texts_from_cache, samples_from_cache
from .schedules import evaluation_weights, lr_multiplier, make_optimizer, make_scheduler, restore_train_weights
from .sigmas import sample_sigmas
from .tb_log import TensorBoardLog, require_tensorboard

__all__ = [
    "TrainSample", "CachedTrainSample", "samples_from_cache", "empty_texts_from_cache",
    "TrainConfig", "TrainEvent", "TrainResult", "TrainingError", "ResumeError",
    "TIMESTEP_SAMPLING", "I2V_MODES", "LOSS_EMA_BETA", "LORA_FILE",
    "sample_sigmas", "plan_epoch", "gradient_checkpointing", "list_checkpoints", "train_lora",
]

#: β of the reported loss EMA.
LOSS_EMA_BETA = 0.9


@dataclass
class _Snapshot:
    """The loop state at a step boundary (with the LoRA and optimizer as they are then)."""

    step: int
    epoch: int
    position: int
    order: list[list[int]] | None
    generator: Tensor
    rng: dict[str, Any]
    n_losses: int


def _check_sample_fields(samples: Sequence[Any], adapter: TrainingAdapter, what: str) -> None:
    needed = ("bucket", "frames", "item_id", *adapter.sample_fields)
    for i, s in enumerate(samples):
        lacking = [a for a in needed
                   if a not in getattr(s, "__dict__", {}) and not hasattr(type(s), a)]  # no property reads
        if lacking:
            raise TrainingError(f"{what} {i} ({type(s).__name__}) lacks {', '.join(lacking)}; pass the "
                                f"{adapter.name} samples of its training module or samples_from_cache(...) results.")


class _Run:
    """State and steps of one :func:`train_lora` call."""

    def __init__(self, model: nn.Module, adapter: TrainingAdapter, samples: list, empty_text: Any,
                 config: TrainConfig, run_dir: Path, device: torch.device, metadata: Mapping[str, Any] | None,
                 holdout: list, dist: DistributedContext = SINGLE_PROCESS) -> None:
        self.model, self.adapter, self.samples, self.config = model, adapter, samples, config
        self.run_dir, self.device, self.holdout, self.dist = run_dir, device, holdout, dist
        adapter.check(model, config)
        self.user_metadata = metadata_strings(metadata)
        _check_sample_fields(samples, adapter, "sample")
        _check_sample_fields(holdout, adapter, "held-out sample")
        if config.validation_loss_every and not holdout:
            raise TrainingError(f"validation_loss_every={config.validation_loss_every} needs held-out samples (a "
                                "second cached dataset of the same model family, passed as holdout / validation "
                                "data); pass them, or set validation_loss_every to 0.")
        self.keys = [(tuple(int(v) for v in s.bucket), int(s.frames)) for s in samples]
        self.repeats = [check_int(f"repeats of sample {s.item_id!r}", getattr(s, "repeats", 1), 1) for s in samples]
        check_world_divides(self.keys, self.repeats, config.batch_size, dist.world_size)
        self.dataset_hash = hashlib.sha256(json.dumps(
            [[str(s.item_id), list(k[0]), k[1], r] for s, k, r in zip(samples, self.keys, self.repeats)]
        ).encode()).hexdigest()
        self.batches_per_epoch = batches_per_epoch(self.keys, self.repeats, config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.max_steps = config.epochs * self.steps_per_epoch if config.epochs else config.max_steps
        if config.epochs and config.warmup_steps > self.max_steps:  # TrainConfig checks it for max_steps
            raise TrainingError(f"warmup_steps={config.warmup_steps} is longer than the run ({self.max_steps} steps "
                                f"= {config.epochs} epochs × {self.steps_per_epoch} steps): use at most "
                                f"{self.max_steps} warm-up steps, or train longer.")
        self.empty = adapter.empty_caption(model, empty_text, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.order: list[list[int]] | None = None
        self.losses: list[float] = []
        self.ema = 0.0
        self.weight_ema: LoRAEMA | None = None
        self.modules: dict[str, LoRALinear] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # ----------------------------------------------------------------------------------------------- setup

    def preflight(self) -> None:
        """Check one sample of every (bucket, frames) group before anything is written."""
        seen: set = set()
        for i, key in enumerate(self.keys):
            if key not in seen:
                seen.add(key)
                self.adapter.load_batch(self.model, [self.samples[i]], self.config)
        for s in self.holdout:
            self.adapter.load_batch(self.model, [s], self.config)

    def setup(self, fresh: bool) -> None:
        """Inject the LoRA (then ``init_lora`` when ``fresh``), build optimizer, schedule and weight EMA."""
        cfg = self.config
        self.modules = inject_lora(self.model, rank=cfg.rank, alpha=cfg.alpha, targets=self.adapter.lora_targets(cfg),
                                   within=self.adapter.lora_within, dtype=cfg.lora_dtype, generator=self.generator,
                                   include=cfg.lora_include, exclude=cfg.lora_exclude, dropout=cfg.lora_dropout,
                                   rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)
        if fresh and cfg.init_lora is not None:
            try:
                grammar = get_family(self.adapter.name).lora_grammar
            except LookupError:
                grammar = None
            init_lora_from_file(self.modules, cfg.init_lora, family_grammar=grammar)
        self.params = [p for m in self.modules.values() for p in (m.lora_down, m.lora_up)]
        self.param_names = [f"{path}.{half}" for path in self.modules for half in ("lora_down", "lora_up")]
        for p in self.params:  # under block swap a base weight may live in CPU memory; the adapter trains on device
            p.data = p.data.to(self.device)
        self.optimizer = make_optimizer(self.params, cfg.optimizer, lr=cfg.learning_rate,
                                        weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps,
                                        d_coef=cfg.d_coef, safeguard_warmup=cfg.safeguard_warmup)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                                        max_steps=self.max_steps, min_lr_ratio=cfg.min_lr_ratio)
        restore_train_weights(self.optimizer, self.params, None)
        if cfg.ema_decay:
            self.weight_ema = LoRAEMA(self.modules, cfg.ema_decay)

    def fingerprint(self) -> dict[str, Any]:
        model_cfg = getattr(self.model, "config", None)
        return {"layers": {p: [m.in_features, m.out_features] for p, m in self.modules.items()},
                "rank": self.config.rank, "alpha": self.config.alpha, "optimizer": self.config.optimizer,
                "model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else None}

    def _sync_lr(self) -> None:
        """Point the schedule at this config's lr and step (after loading a checkpoint's scheduler state)."""
        s = self.scheduler
        lr = self.config.learning_rate * lr_multiplier(self.config.lr_schedule, s.last_epoch,
                                                       warmup_steps=self.config.warmup_steps,
                                                       max_steps=self.max_steps,
                                                       min_lr_ratio=self.config.min_lr_ratio)
        s.base_lrs = [self.config.learning_rate] * len(self.optimizer.param_groups)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.config.learning_rate
            g["lr"] = lr
        s._last_lr = [lr] * len(self.optimizer.param_groups)

    def load(self, ckpt: Path) -> None:
        """Restore everything from a checkpoint folder (after :meth:`setup`)."""
        state = read_state(ckpt)
        check_fingerprint(ckpt, state["fingerprint"], self.fingerprint(), self.config)
        weights = load_lora(ckpt / LORA_FILE, module_names=list(self.modules))
        missing = [p for p in self.modules if p not in weights.layers]
        if missing:
            raise ResumeError(f"{ckpt / LORA_FILE} lacks {len(missing)} LoRA layers ({', '.join(missing[:3])}); the "
                              "checkpoint is damaged. Delete that folder to resume from the previous checkpoint.")
        with torch.no_grad():
            for path, m in self.modules.items():
                down, up, _ = weights.layers[path]
                m.lora_down.copy_(down)
                m.lora_up.copy_(up)
        self.optimizer.load_state_dict(state["optimizer"])
        saved_y = state.get("train_weights")
        if saved_y is not None and not all(n in saved_y for n in self.param_names):
            raise ResumeError(f"{ckpt / 'state.pt'} lacks train-mode weights of some LoRA layers; the checkpoint is "
                              "damaged. Delete that folder to resume from the previous checkpoint.")
        restore_train_weights(self.optimizer, self.params,
                              None if saved_y is None else [saved_y[n] for n in self.param_names])
        self.scheduler.load_state_dict(state["scheduler"])
        self._sync_lr()
        if self.weight_ema is not None:
            if "ema" in state:
                self.weight_ema.load_state_dict(state["ema"])
            else:
                self.weight_ema = LoRAEMA(self.modules, self.config.ema_decay)  # EMA turned on now: starts here
        self.generator.set_state(state["generator"])
        set_global_rng_state(state["rng"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self.order = state["order"]
        self.losses = [float(x) for x in state["losses"]]
        self.ema = 0.0
        for loss in self.losses:
            self.ema = LOSS_EMA_BETA * self.ema + (1 - LOSS_EMA_BETA) * loss
        if state.get("dataset") != self.dataset_hash and self.order is not None:
            warnings.warn(f"The samples differ from those of {ckpt} (added, removed or reordered): the rest of "
                          f"epoch {self.epoch + 1} is skipped and a new epoch starts with the current samples.",
                          stacklevel=3)
            self.order, self.position, self.epoch = None, 0, self.epoch + 1

    # ----------------------------------------------------------------------------------------------- saving

    def snapshot(self) -> _Snapshot:
        # The order is replaced, never changed in place, so it needs no copy.
        return _Snapshot(self.step, self.epoch, self.position, self.order, self.generator.get_state(),
                         global_rng_state(), len(self.losses))

    def lora_metadata(self, step: int, epoch: int, complete: bool) -> dict[str, str]:
        cfg = self.config
        meta = dict(self.user_metadata)
        meta.update({
            "cinetune.steps": str(step), "cinetune.max_steps": str(self.max_steps),
            "cinetune.complete": "true" if complete else "false",
            "cinetune.training": json.dumps(cfg.to_dict(), sort_keys=True),
            "ss_steps": str(step), "ss_epoch": str(epoch + 1), "ss_learning_rate": f"{cfg.learning_rate:g}",
            "ss_lr_scheduler": cfg.lr_schedule, "ss_optimizer": cfg.optimizer, "ss_seed": str(cfg.seed),
        })
        return meta

    def save_checkpoint(self, snap: _Snapshot) -> Path:
        """Write ``checkpoints/step_N`` from ``snap`` plus the current LoRA/optimizer/scheduler; prune old ones."""
        if not self.dist.is_main:  # every rank holds the same LoRA and optimizer state; rank 0 writes it
            return self.run_dir / CHECKPOINTS_DIR / f"step_{snap.step:06d}"
        meta = self.lora_metadata(snap.step, snap.epoch, snap.step >= self.max_steps)
        with evaluation_weights(self.optimizer, self.params) as train_weights:
            state = {"format": STATE_FORMAT, "step": snap.step, "epoch": snap.epoch, "position": snap.position,
                     "order": snap.order, "generator": snap.generator, "rng": snap.rng,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "losses": self.losses[:snap.n_losses], "config": self.config.to_dict(),
                     "fingerprint": self.fingerprint(), "dataset": self.dataset_hash}
            if train_weights is not None:
                state["train_weights"] = dict(zip(self.param_names, train_weights))
            if self.weight_ema is not None:
                state["ema"] = self.weight_ema.state_dict()
            return write_checkpoint(
                self.run_dir, snap.step, keep=self.config.keep_checkpoints, state=state,
                write_lora=lambda path: save_lora(path, self.modules, dtype=self.config.lora_dtype, metadata=meta))

    def save_final_lora(self, snap: _Snapshot) -> Path:
        """Write ``run_dir/lora.safetensors`` (and ``lora_ema.safetensors`` with EMA) through the adapter."""
        if not self.dist.is_main:
            return self.run_dir / LORA_FILE
        meta = self.lora_metadata(snap.step, snap.epoch, snap.step >= self.max_steps)
        if self.weight_ema is not None:
            self.adapter.save_lora(self.run_dir / EMA_LORA_FILE, self.weight_ema.weights(),
                                   dtype=self.config.save_dtype,
                                   metadata={**meta, "cinetune.ema_decay": f"{self.config.ema_decay:g}"})
        with evaluation_weights(self.optimizer, self.params):
            return self.adapter.save_lora(self.run_dir / LORA_FILE, self.modules, dtype=self.config.save_dtype,
                                          metadata=meta)

    def write_run_json(self, resumed_from: Path | None) -> None:
        if not self.dist.is_main:
            return
        write_json_atomic({
            "format": STATE_FORMAT, "config": self.config.to_dict(), "metadata": self.user_metadata,
            "max_steps": self.max_steps, "samples": len(self.samples), "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "dataset_hash": self.dataset_hash,
            "resumed_from": None if resumed_from is None else str(resumed_from), "resumed_at_step": self.step,
        }, self.run_dir / RUN_FILE)

    # ----------------------------------------------------------------------------------------------- stepping

    def next_window(self) -> list[list[int]]:
        if self.order is None or self.position >= len(self.order):
            if self.order is not None:
                self.epoch += 1
            self.order = plan_epoch(self.keys, self.repeats, self.config.batch_size, self.generator)
            self.position = 0
        end = min(self.position + self.config.grad_accum, len(self.order))
        window = self.order[self.position:end]
        self.position = end
        return window

    def micro_batch_loss(self, idxs: list[int]) -> LossTerms:
        cfg = self.config
        batch = self.adapter.load_batch(self.model, [self.samples[i] for i in idxs], cfg)
        sigma = sample_sigmas(cfg.timestep_sampling, len(idxs), flow_shift=cfg.flow_shift,
                              sigmoid_scale=cfg.sigmoid_scale, generator=self.generator, tokens=batch.tokens,
                              sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
        if cfg.lora_dropout or cfg.rank_dropout or cfg.module_dropout:
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=self.generator)))
        share = {"share": self.dist.share_slice(len(idxs))} if self.dist.distributed else {}
        return self.adapter.loss(self.model, batch, sigma, generator=self.generator, empty=self.empty, config=cfg,
                                 device=self.device, **share)

    def forward_backward(self) -> tuple[float, dict[str, float], float]:
        """Accumulate the gradients of one optimizer step (clipped when ``max_grad_norm`` > 0); returns its loss and
        loss parts (means over micro-batches) and the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        window = self.next_window()
        losses: list[float] = []
        parts: dict[str, list[float]] = {}
        for idxs in window:
            terms = self.micro_batch_loss(idxs)
            (terms.total / len(window)).backward()
            losses.append(float(terms.total.detach()))
            for name, value in terms.parts.items():
                parts.setdefault(name, []).append(float(value))
        if self.dist.distributed:  # each rank's loss is its share's part of the micro-batch's: sum them
            self.dist.reduce_gradients(self.params, op="sum")
            names = sorted(parts)
            summed = self.dist.sum_values(losses + [v for n in names for v in parts[n]])
            losses = summed[:len(losses)]
            parts = {n: summed[len(losses) * (i + 1):len(losses) * (i + 2)] for i, n in enumerate(names)}
        step_loss = sum(losses) / len(losses)
        if not math.isfinite(step_loss):
            raise TrainingError(f"The loss is {step_loss} at step {self.step + 1}; nothing of this step was applied. "
                                "Lower the learning rate, use compute_dtype bf16 instead of fp16, or check the "
                                "cached latents, then resume from the last checkpoint.")
        if self.config.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        if not math.isfinite(norm):
            raise TrainingError(f"The gradient norm is {norm} at step {self.step + 1}; nothing of this step was "
                                "applied. Lower the learning rate or use compute_dtype bf16 instead of fp16, "
                                "then resume from the last checkpoint.")
        return step_loss, {name: sum(v) / len(v) for name, v in parts.items()}, norm

    # ----------------------------------------------------------------------------------------------- evaluating

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Model in eval mode, no grad, schedule-free evaluation weights; training state restored on exit."""
        self.model.eval()
        try:
            with torch.no_grad(), evaluation_weights(self.optimizer, self.params):
                yield
        finally:
            self.model.train()

    def heldout_due(self) -> bool:
        every = self.config.validation_loss_every
        return bool(self.holdout) and ((every and self.step % every == 0) or self.step >= self.max_steps)

    def checkpoint_due(self, epoch: int, epoch_done: bool) -> bool:
        cfg = self.config
        return (self.step >= self.max_steps or bool(cfg.save_every and self.step % cfg.save_every == 0)
                or bool(cfg.save_every_epochs and epoch_done and (epoch + 1) % cfg.save_every_epochs == 0))


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def train_lora(model: nn.Module, samples: Sequence[Any], empty_text: Any, config: TrainConfig,
               run_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
               resume: bool | str | os.PathLike = False, on_event: Callable[[TrainEvent], Any] | None = None,
               check_interrupt: Callable[[], Any] | None = None,
               validate: Callable[[int, nn.Module], Any] | None = None, validate_every: int = 0,
               metadata: Mapping[str, Any] | None = None, adapter: TrainingAdapter | None = None,
               holdout: Sequence[Any] | None = None,
               distributed: DistributedContext | None = None) -> TrainResult:
    """Train (or resume) a LoRA on a DiT of any registered family; every semantic is described in the module notes.

    Args:
        model: the family's DiT, weights on ``device`` (or managed by block swap), without LoRA layers. LoRA layers
            are injected for the run (their parameters on ``device``) and removed before returning; the model is
            otherwise unchanged.
        samples: the family's samples (e.g. ``K5Sample``, ``LTX2Sample``, :func:`samples_from_cache`), ≥ 1. Their
            order matters for resuming (keep it stable).
        empty_text: the empty-caption embedding for caption dropout, in the family's form (Kandinsky 5:
            ``(text [L, D], pooled [D2])`` or ``{template: (text, pooled)}``, :func:`empty_texts_from_cache`;
            LTX-2: ``(features [L, D], mask [L])``); may be None when ``caption_dropout`` is 0.
        config: :class:`TrainConfig`.
        run_dir: the run folder (created): ``checkpoints/``, ``run.json``, ``lora.safetensors``.
        device: where batches go (the model's device).
        resume: False (new run; the folder must hold no checkpoint), True (continue the newest checkpoint of
            ``run_dir``, else start), or a checkpoint/run folder to continue from.
        on_event: called with a :class:`TrainEvent` after every optimizer step.
        check_interrupt: called before every optimizer step; whatever it raises propagates after a checkpoint is
            saved.
        validate: ``validate(step, model)`` every ``validate_every`` steps (model in eval mode with the current
            LoRA, under ``torch.no_grad``).
        metadata: extra LoRA file metadata (base model, variant, dataset hash, ``trigger`` word, …); non-string
            values are JSON-encoded. Keys ``cinetune.*`` and ``ss_*`` written by the trainer take precedence.
        adapter: the family's :class:`~cinetune.training.adapter.TrainingAdapter`; None = the registered one that
            accepts ``model`` (:func:`~cinetune.training.adapter.training_adapter_for`).
        holdout: held-out samples of the same family for the validation loss (:mod:`cinetune.training.holdout`),
            computed every ``config.validation_loss_every`` steps and at the last step; None or empty = none.
        distributed: this process's :class:`~cinetune.training.distributed.DistributedContext` under torchrun
            (None = one process): every rank walks the same epoch plan and draws, trains on its share of each
            micro-batch (the adapter's ``share``), the LoRA gradients and losses are summed over the ranks in
            float32, and rank 0 alone writes files. The state is the same on every rank, so checkpoints resume on
            any world size.

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainingError: no adapter for the model; bad samples/held-out samples/config/empty text (names the sample
            and the fix); ``validation_loss_every`` without held-out samples; warm-up longer than the run; a
            non-finite loss or gradient norm.
        ResumeError: the checkpoint does not fit this run (other model, rank, alpha, optimizer) or cannot be read.
        ImportError: optimizer package missing (bitsandbytes, prodigyopt, schedulefree) or tensorboard missing with
            ``tensorboard=True``; the message has the ``pip install`` line.
        LoRAError: the model already holds LoRA layers; no layer matches the targets; an include/exclude pattern
            matches no layer; ``init_lora`` does not fit (rank, layers, shapes).
        AttentionBackendError: the attention backend is unknown or not installed.
        Whatever ``check_interrupt``, ``on_event`` or ``validate`` raise, after the checkpoint is saved.
    """
    if not isinstance(config, TrainConfig):
        raise TrainingError(f"config must be a TrainConfig, got {type(config).__name__}.")
    if adapter is None:
        adapter = training_adapter_for(model)
    elif not isinstance(adapter, TrainingAdapter):
        raise TrainingError(f"adapter must be a TrainingAdapter (e.g. cinetune.k5.train.K5_TRAINING), got "
                            f"{type(adapter).__name__}.")
    samples = list(samples)
    if not samples:
        raise TrainingError("No training samples: cache a dataset first (at least one video or image).")
    check_int("validate_every", validate_every, 0)
    check_backend(config.attention_backend)
    if config.tensorboard:
        require_tensorboard()
    run_dir = Path(run_dir)
    resume_from = resolve_resume(run_dir, resume)
    dist = distributed or SINGLE_PROCESS
    run = _Run(model, adapter, samples, empty_text, config, run_dir, torch.device(device), metadata,
               list(holdout or ()), dist)

    run.preflight()
    was_training = model.training
    had_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    tb = None
    with torch.inference_mode(False), torch.enable_grad():
        try:
            run.setup(fresh=resume_from is None)
            if resume_from is not None:
                run.load(resume_from)
            if dist.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                remove_leftovers(run_dir)
            run.write_run_json(resume_from)
            if config.tensorboard and dist.is_main:
                tb = TensorBoardLog(run_dir, purge_step=None if resume_from is None else run.step + 1)
            model.train()
            with (adapter.running(model, config, run.device),
                  gradient_checkpointing(adapter.blocks(model), config.gradient_checkpointing)):
                return _loop(run, on_event, check_interrupt, validate, validate_every, tb)
        finally:
            if tb is not None:
                tb.close()
            model.train(was_training)
            if not had_lora:  # inject_lora refuses such a model; never strip the caller's own adapters
                remove_lora(model)
            for p, flag in grad_flags:
                p.requires_grad_(flag)


def _loop(run: _Run, on_event, check_interrupt, validate, validate_every: int,
          tb: TensorBoardLog | None) -> TrainResult:
    model = run.model
    start_step, t0 = run.step, time.perf_counter()
    saved_at: Path | None = None
    snap = run.snapshot()
    updating = False
    try:
        while run.step < run.max_steps:
            if check_interrupt is not None:
                check_interrupt()
            lr = run.optimizer.param_groups[0]["lr"]
            loss, parts, grad_norm = run.forward_backward()
            # the epoch of this step's window (it may have started a new one) and whether the window ended it
            epoch, epoch_done = run.epoch, run.position >= len(run.order)
            updating = True
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            if run.weight_ema is not None:
                run.weight_ema.update()
            run.step += 1
            run.losses.append(loss)
            updating = False
            snap = run.snapshot()
            saved_at = None

            held_out = None
            if run.heldout_due():
                with run.evaluating():
                    held_out = heldout_loss(model, run.adapter, run.holdout, run.config, device=run.device)
            if run.checkpoint_due(epoch, epoch_done):
                saved_at = run.save_checkpoint(snap)
            run.ema = LOSS_EMA_BETA * run.ema + (1 - LOSS_EMA_BETA) * loss
            done = run.step - start_step
            rate = done / max(time.perf_counter() - t0, 1e-9)
            event = TrainEvent(step=run.step, max_steps=run.max_steps, loss=loss,
                               loss_ema=run.ema / (1 - LOSS_EMA_BETA ** len(run.losses)), lr=float(lr),
                               steps_per_s=rate, eta_s=(run.max_steps - run.step) / rate, epoch=epoch + 1,
                               loss_terms=parts, grad_norm=grad_norm, validation_loss=held_out,
                               checkpoint=None if saved_at is None else str(saved_at))
            if tb is not None:
                tb.log(event)
            if on_event is not None:
                on_event(event)
            if validate is not None and validate_every and run.step % validate_every == 0:
                with run.evaluating():
                    validate(run.step, model)
        if saved_at is None:
            saved_at = run.save_checkpoint(snap)
        lora_path = run.save_final_lora(snap)
    except BaseException as exc:
        if updating:
            _add_note(exc, f"Training stopped inside the optimizer update of step {run.step + 1}; no checkpoint was "
                           "written for it. Resume continues from the last checkpoint in "
                           f"{run.run_dir / CHECKPOINTS_DIR}.")
            raise
        try:
            ckpt = saved_at if saved_at is not None else run.save_checkpoint(snap)
            run.save_final_lora(snap)
        except Exception as save_exc:  # report the original error; the save failure rides along
            _add_note(exc, f"Saving a checkpoint of step {snap.step} failed too: {save_exc!r}.")
            raise exc
        _add_note(exc, f"Training stopped at step {snap.step}; resumable checkpoint saved in {ckpt}, LoRA in "
                       f"{run.run_dir / LORA_FILE}.")
        raise
    return TrainResult(lora_path=Path(lora_path), steps=run.step, losses=list(run.losses), checkpoint_dir=saved_at,
                       ema_lora_path=None if run.weight_ema is None else run.run_dir / EMA_LORA_FILE)
