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
  batch), then the adapter draws the rest in its documented order. The global torch/NumPy/Python RNG states are
  saved and restored too, but the loop does not use them.
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
- **Checkpoints** (layout in :mod:`~cinetune.training.checkpointing`): written every ``save_every`` steps and at
  the end; the newest ``keep_checkpoints`` are kept (0 keeps all). The final LoRA ``run_dir/lora.safetensors`` is
  written by the adapter (:meth:`~cinetune.training.adapter.TrainingAdapter.save_lora`) in ``save_dtype`` (bf16 by
  default) at the end and at an interruption (then with metadata ``cinetune.complete = "false"``).
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
- **Events**: ``loss_ema`` is the bias-corrected exponential moving average of the step losses,
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.attention import check_backend
from ..core.checkpoint import write_json_atomic
from ..core.lora import LoRALinear, inject_lora, load_lora, remove_lora, save_lora
from .adapter import LossTerms, TrainingAdapter, gradient_checkpointing, training_adapter_for
from .checkpointing import (CHECKPOINTS_DIR, LORA_FILE, RUN_FILE, STATE_FORMAT, check_fingerprint, global_rng_state,
                            list_checkpoints, metadata_strings, read_state, remove_leftovers, resolve_resume,
                            set_global_rng_state, write_checkpoint)
from .config import (I2V_MODES, TIMESTEP_SAMPLING, ResumeError, TrainConfig, TrainEvent, TrainingError, TrainResult,
                     check_int)
from .samples import CachedTrainSample, TrainSample, empty_texts_from_cache, samples_from_cache
from .schedules import lr_multiplier, make_optimizer, make_scheduler
from .sigmas import sample_sigmas

__all__ = [
    "TrainSample", "CachedTrainSample", "samples_from_cache", "empty_texts_from_cache",
    "TrainConfig", "TrainEvent", "TrainResult", "TrainingError", "ResumeError",
    "TIMESTEP_SAMPLING", "I2V_MODES", "LOSS_EMA_BETA", "LORA_FILE",
    "sample_sigmas", "plan_epoch", "gradient_checkpointing", "list_checkpoints", "train_lora",
]

#: β of the reported loss EMA.
LOSS_EMA_BETA = 0.9


def plan_epoch(keys: Sequence[Hashable], repeats: Sequence[int], batch_size: int,
               generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches of sample indices (algorithm in the module notes).

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


def _batches_per_epoch(keys: Sequence[Hashable], repeats: Sequence[int], batch_size: int) -> int:
    counts: dict[Hashable, int] = {}
    for k, r in zip(keys, repeats):
        counts[k] = counts.get(k, 0) + r
    return sum(math.ceil(n / batch_size) for n in counts.values())


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


class _Run:
    """State and steps of one :func:`train_lora` call."""

    def __init__(self, model: nn.Module, adapter: TrainingAdapter, samples: list, empty_text: Any,
                 config: TrainConfig, run_dir: Path, device: torch.device, metadata: Mapping[str, Any] | None) -> None:
        self.model, self.adapter, self.samples, self.config = model, adapter, samples, config
        self.run_dir, self.device = run_dir, device
        adapter.check(model, config)
        self.user_metadata = metadata_strings(metadata)
        needed = ("bucket", "frames", "item_id", *adapter.sample_fields)
        for i, s in enumerate(samples):
            lacking = [a for a in needed
                       if a not in getattr(s, "__dict__", {}) and not hasattr(type(s), a)]  # no property reads
            if lacking:
                raise TrainingError(f"sample {i} ({type(s).__name__}) lacks {', '.join(lacking)}; pass the "
                                    f"{adapter.name} samples of its training module or samples_from_cache(...) "
                                    "results.")
        self.keys = [(tuple(int(v) for v in s.bucket), int(s.frames)) for s in samples]
        self.repeats = [check_int(f"repeats of sample {s.item_id!r}", getattr(s, "repeats", 1), 1) for s in samples]
        self.dataset_hash = hashlib.sha256(json.dumps(
            [[str(s.item_id), list(k[0]), k[1], r] for s, k, r in zip(samples, self.keys, self.repeats)]
        ).encode()).hexdigest()
        self.batches_per_epoch = _batches_per_epoch(self.keys, self.repeats, config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.max_steps = config.epochs * self.steps_per_epoch if config.epochs else config.max_steps
        self.empty = adapter.empty_caption(model, empty_text, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.order: list[list[int]] | None = None
        self.losses: list[float] = []
        self.ema = 0.0
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

    def setup(self) -> None:
        cfg = self.config
        self.modules = inject_lora(self.model, rank=cfg.rank, alpha=cfg.alpha, targets=self.adapter.lora_targets(cfg),
                                   within=self.adapter.lora_within, dtype=cfg.lora_dtype, generator=self.generator)
        self.params = [p for m in self.modules.values() for p in (m.lora_down, m.lora_up)]
        for p in self.params:  # under block swap a base weight may live in CPU memory; the adapter trains on device
            p.data = p.data.to(self.device)
        self.optimizer = make_optimizer(self.params, cfg.optimizer, lr=cfg.learning_rate,
                                        weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                                        max_steps=self.max_steps)

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
                                                       max_steps=self.max_steps)
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
        self.scheduler.load_state_dict(state["scheduler"])
        self._sync_lr()
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
        meta = self.lora_metadata(snap.step, snap.epoch, snap.step >= self.max_steps)
        return write_checkpoint(
            self.run_dir, snap.step, keep=self.config.keep_checkpoints,
            write_lora=lambda path: save_lora(path, self.modules, dtype=self.config.lora_dtype, metadata=meta),
            state={"format": STATE_FORMAT, "step": snap.step, "epoch": snap.epoch, "position": snap.position,
                   "order": snap.order, "generator": snap.generator, "rng": snap.rng,
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "losses": self.losses[:snap.n_losses], "config": self.config.to_dict(),
                   "fingerprint": self.fingerprint(), "dataset": self.dataset_hash})

    def save_final_lora(self, snap: _Snapshot) -> Path:
        return self.adapter.save_lora(self.run_dir / LORA_FILE, self.modules, dtype=self.config.save_dtype,
                                      metadata=self.lora_metadata(snap.step, snap.epoch, snap.step >= self.max_steps))

    def write_run_json(self, resumed_from: Path | None) -> None:
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
                              sigmoid_scale=cfg.sigmoid_scale, generator=self.generator, tokens=batch.tokens)
        return self.adapter.loss(self.model, batch, sigma, generator=self.generator, empty=self.empty, config=cfg,
                                 device=self.device)

    def forward_backward(self) -> tuple[float, dict[str, float]]:
        """Accumulate the gradients of one optimizer step; returns its loss and loss parts (means over
        micro-batches)."""
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
        step_loss = sum(losses) / len(losses)
        if not math.isfinite(step_loss):
            raise TrainingError(f"The loss is {step_loss} at step {self.step + 1}; nothing of this step was applied. "
                                "Lower the learning rate, use compute_dtype bf16 instead of fp16, or check the "
                                "cached latents, then resume from the last checkpoint.")
        if self.config.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
            if not math.isfinite(norm):
                raise TrainingError(f"The gradient norm is {norm} at step {self.step + 1}; nothing of this step was "
                                    "applied. Lower the learning rate or use compute_dtype bf16 instead of fp16, "
                                    "then resume from the last checkpoint.")
        return step_loss, {name: sum(v) / len(v) for name, v in parts.items()}


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def train_lora(model: nn.Module, samples: Sequence[Any], empty_text: Any, config: TrainConfig,
               run_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
               resume: bool | str | os.PathLike = False, on_event: Callable[[TrainEvent], Any] | None = None,
               check_interrupt: Callable[[], Any] | None = None,
               validate: Callable[[int, nn.Module], Any] | None = None, validate_every: int = 0,
               metadata: Mapping[str, Any] | None = None, adapter: TrainingAdapter | None = None) -> TrainResult:
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

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainingError: no adapter for the model; bad samples/config/empty text (names the sample and the fix); a
            non-finite loss.
        ResumeError: the checkpoint does not fit this run (other model, rank, alpha, optimizer) or cannot be read.
        ImportError: optimizer package missing (``pip install bitsandbytes`` for adamw8bit).
        LoRAError: the model already holds LoRA layers; no layer matches the targets.
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
    run_dir = Path(run_dir)
    resume_from = resolve_resume(run_dir, resume)
    run = _Run(model, adapter, samples, empty_text, config, run_dir, torch.device(device), metadata)

    run.preflight()
    was_training = model.training
    had_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    with torch.inference_mode(False), torch.enable_grad():
        try:
            run.setup()
            if resume_from is not None:
                run.load(resume_from)
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(run_dir)
            run.write_run_json(resume_from)
            model.train()
            with (adapter.running(model, config, run.device),
                  gradient_checkpointing(adapter.blocks(model), config.gradient_checkpointing)):
                return _loop(run, on_event, check_interrupt, validate, validate_every)
        finally:
            model.train(was_training)
            if not had_lora:  # inject_lora refuses such a model; never strip the caller's own adapters
                remove_lora(model)
            for p, flag in grad_flags:
                p.requires_grad_(flag)


def _loop(run: _Run, on_event, check_interrupt, validate, validate_every: int) -> TrainResult:
    model, cfg = run.model, run.config
    start_step, t0 = run.step, time.perf_counter()
    saved_at: Path | None = None
    snap = run.snapshot()
    updating = False
    try:
        while run.step < run.max_steps:
            if check_interrupt is not None:
                check_interrupt()
            lr = run.optimizer.param_groups[0]["lr"]
            loss, parts = run.forward_backward()
            epoch = run.epoch  # of this step's window (it may have started a new epoch)
            updating = True
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.losses.append(loss)
            updating = False
            snap = run.snapshot()
            saved_at = None

            run.ema = LOSS_EMA_BETA * run.ema + (1 - LOSS_EMA_BETA) * loss
            done = run.step - start_step
            rate = done / max(time.perf_counter() - t0, 1e-9)
            if on_event is not None:
                on_event(TrainEvent(step=run.step, max_steps=run.max_steps, loss=loss,
                                    loss_ema=run.ema / (1 - LOSS_EMA_BETA ** len(run.losses)), lr=float(lr),
                                    steps_per_s=rate, eta_s=(run.max_steps - run.step) / rate, epoch=epoch + 1,
                                    loss_terms=parts))
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.max_steps:
                saved_at = run.save_checkpoint(snap)
            if validate is not None and validate_every and run.step % validate_every == 0:
                model.eval()
                try:
                    with torch.no_grad():
                        validate(run.step, model)
                finally:
                    model.train()
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
            ckpt = run.save_checkpoint(snap)
            run.save_final_lora(snap)
        except Exception as save_exc:  # report the original error; the save failure rides along
            _add_note(exc, f"Saving a checkpoint of step {snap.step} failed too: {save_exc!r}.")
            raise exc
        _add_note(exc, f"Training stopped at step {snap.step}; resumable checkpoint saved in {ckpt}, LoRA in "
                       f"{run.run_dir / LORA_FILE}.")
        raise
    return TrainResult(lora_path=Path(lora_path), steps=run.step, losses=list(run.losses), checkpoint_dir=saved_at)
