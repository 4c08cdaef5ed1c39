"""What the LoRA trainer nodes of both families share (the nodes: :mod:`.trainer_k5`, :mod:`.trainer_ltx2`): one
execution runs (or resumes) a whole run.

Every optimizer step sends a ``cinetune.train.progress`` websocket event (drawn by web/js/loss_chart.js; it carries
every field of :class:`~cinetune.training.config.TrainEvent`: LTX-2 loss parts, gradient norm, held-out loss) and
checks for interruption; an interrupted run leaves a resumable checkpoint and a usable LoRA. The final LoRA (and the
EMA LoRA, when kept) is copied into ComfyUI's ``loras`` folder, in the key layout native ``LoraLoaderModelOnly``
reads; a file of another origin under those names is refused before the first step, not after the run. The
checks, run folders, reuse of a finished run, validation scheduling and the settings nodes' values live
in :mod:`cinetune.training.runs`; the validation samplers in the families' libraries.

Both trainers keep their widgets (the inputs they share are declared in :mod:`.trainer_inputs`); optional inputs
appended at the end take the settings nodes (:mod:`.train_settings`), laid over the widgets, a chain of validation
prompts and a held-out cached dataset.
Validation clips (one per prompt) are made at step 0 when asked (only when a run starts fresh, with the LoRA it
starts from) and at the trainer's validation steps; the settings of the validation are saved in the run's metadata
(``run.json`` and the LoRA file), so a headless run sees them.

Every run folder gets the run's recipe (:mod:`cinetune.training.recipe`) before the first step, so the run can be
continued headless (``python -m cinetune.training.launch``). The last input, ``gpus``, hands a run to that many local
worker processes under torchrun (:func:`~cinetune.training.launch.launch_workers`) and follows their events; the
workers render no validation clips, so ``gpus`` > 1 with validation clips is refused (queue time where the widgets
show it) rather than silently skipping them. After Cancel or an error the partial LoRA is installed as
``<output_name>_step<k>`` and its path is the "interrupted" status message.

Widget order is frozen once released: add new inputs at the end, with defaults.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from comfy_api.latest import io, ui

from ..core.lora import loras_applied
from ..core.lora_formats import load_lora
from ..core.offload import model_on_device
from ..training.adapter import TrainingAdapter
from ..training.checkpointing import list_checkpoints, resolve_resume
from ..training.config import TrainConfig, TrainEvent, TrainingError
from ..training.data import dataset_fingerprint
from ..training.distributed import check_local_workers, check_world_divides
from ..training.launch import launch_workers
from ..training.recipe import CachedData, RunRecipe, write_recipe
from ..training.runs import (ValidationPlan, check_base_model, check_install_targets, finished_run, install_lora,
                             install_partial_lora, latest_validations, run_directory)
from ..training.schedules import OPTIMIZERS, make_optimizer
from ..training.settings import ValidationPrompt, ValidationPrompts, checked_settings, config_overrides
from ..training.trainer import train_lora
from . import host
from .checks import CinetuneNode, FileName, InputError, check_file_name
from .model_nodes import block_swap, training_dtype

PROGRESS_EVENT = "cinetune.train.progress"
STATUS_EVENT = "cinetune.train.status"
CATEGORY = "Cinetune/training"

#: ``output_name`` names the run folder and ``models/loras/<name>.safetensors``, written through a temporary file.
OUTPUT_NAME = FileName(suffix=".safetensors", atomic=True)
#: The EMA LoRA is installed as ``<output_name>_ema``.
EMA_SUFFIX = "_ema"
#: The trainer widgets whose combination the training config checks at queue time.
_COMBINED = ("rank", "alpha", "learning_rate", "optimizer", "lr_schedule", "warmup_steps", "max_steps", "epochs")


def run_folder(name: str) -> Path:
    """``<ComfyUI output>/cinetune/runs/<name>``.

    Raises:
        InputError: ``name`` is not a usable file name (:data:`OUTPUT_NAME`).
        TrainingError: that path (or a folder on the way to it) is a file
            (:func:`~cinetune.training.runs.run_directory`).
    """
    return run_directory(host.output_directory(), check_file_name(name, OUTPUT_NAME, "output_name"))


def with_block_swap(handle, blocks_to_swap: int, use_pinned_memory: bool):
    """The model handle with the trainer's block-swap setting (-1 keeps the loader's).

    Raises:
        TrainingError: more blocks to swap than the model has.
    """
    if blocks_to_swap < 0:
        return handle
    return replace(handle, **block_swap(blocks_to_swap, use_pinned_memory, len(handle.blocks), handle.path.name))


def training_handle(base, family: str, blocks_to_swap: int, use_pinned_memory: bool):
    """The handle a trainer trains: the loader's ``base`` handle, which must carry no LoRA, with the trainer's
    block-swap setting (:func:`with_block_swap`); ``family`` is the family's name in node names (``"K5"``).

    Raises:
        TrainingError: LoRAs applied to ``base`` (names the nodes to connect), or too many blocks to swap.
    """
    check_base_model(base.loras, lora_loader=f"{family} LoRA Loader", model_loader=f"{family} Model Loader",
                     trainer=f"{family} Train LoRA")
    return with_block_swap(base, blocks_to_swap, use_pinned_memory)


def config_fields(handle, *, gradient_accumulation: int, gradient_checkpointing: bool, **widgets) -> dict[str, Any]:
    """The :class:`~cinetune.training.config.TrainConfig` fields of the widgets both trainers have.

    Args:
        handle: the model handle being trained (its block swap and attention kernel).
        gradient_accumulation: becomes ``grad_accum``.
        gradient_checkpointing: the widget; block swap turns checkpointing on whatever it says.
        widgets: widgets named as their config field (``rank``, ``alpha``, ``learning_rate``, ...), passed through.
    Returns:
        ``widgets`` with ``grad_accum``, ``gradient_checkpointing``, ``attention_backend`` and ``compute_dtype`` (the
        training activation dtype of the compute device) added.
    """
    return dict(widgets, grad_accum=gradient_accumulation,
                gradient_checkpointing=gradient_checkpointing or handle.blocks_to_swap > 0,
                attention_backend=handle.attention_backend, compute_dtype=training_dtype(host.compute_device()))


def _optimizer_installed(name: Any) -> None:
    """Input rule: the optimizer's optional package is installed (raises ValueError with the pip line)."""
    if name not in OPTIMIZERS:
        return  # the combo check names the options
    try:
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], name, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.99),
                       eps=1e-8)
    except ImportError as e:
        raise ValueError(str(e)) from None
    except Exception:  # anything else is reported when the run builds its optimizer
        pass


class TrainerNode(CinetuneNode):
    """Base of both trainer nodes: per-input checks, then the trainer widgets checked together as the training
    config checks them (warm-up longer than the run, warm-up with a constant schedule, …)."""

    INPUT_RULES = {"output_name": OUTPUT_NAME, "optimizer": _optimizer_installed}

    @classmethod
    def validate_inputs(cls, **values) -> bool:
        super().validate_inputs(**values)
        given = {name: values[name] for name in _COMBINED if values.get(name) is not None}
        try:
            if len(given) == len(_COMBINED):
                checked_settings(**given)
            gpus = values.get("gpus")
            if isinstance(gpus, int) and gpus > 1:
                swap = values.get("blocks_to_swap")
                clips = bool(values.get("validate_every")) or bool(str(values.get("validation_steps") or "").strip())
                check_local_workers(gpus, blocks_to_swap=swap if isinstance(swap, int) else 0,
                                    validation_clips=clips)
        except TrainingError as e:
            raise InputError(f"{cls.define_schema().display_name}: {e}") from None
        return True


class Events:
    """The websocket events of one run on one trainer node."""

    def __init__(self, node_id: str, run: str, max_steps: int) -> None:
        self.node_id, self.run = node_id, run
        self.bar = host.Progress(max_steps)

    def progress(self, e: TrainEvent) -> None:
        self.bar.update(e.step, e.max_steps)
        host.send_event(PROGRESS_EVENT, {"node": self.node_id, "prompt_id": host.current_prompt_id(),
                                         "run": self.run, **vars(e)})

    def status(self, kind: str, step: int, message: str) -> None:
        host.send_event(STATUS_EVENT, {"node": self.node_id, "prompt_id": host.current_prompt_id(), "run": self.run,
                                       "status": kind, "step": step, "message": message})


# ---------------------------------------------------------------------------------------------------------------
# Settings and validation


@dataclass(frozen=True)
class Settings:
    """The settings nodes connected to a trainer (None: not connected)."""

    optimizer: Any = None
    lora: Any = None
    sampling: Any = None
    checkpoint: Any = None

    def config(self, base: dict[str, Any], build: Callable[..., TrainConfig] = TrainConfig) -> TrainConfig:
        """``build(**base)`` with the connected settings laid over ``base`` (the trainer widgets)."""
        return build(**{**base, **config_overrides(self.optimizer, self.lora, self.sampling, self.checkpoint)})

    def start_loras(self, model: torch.nn.Module) -> list:
        """The LoRA a fresh run starts from, as ``(weights, 1.0)`` for :func:`~cinetune.core.lora.loras_applied`
        (step-0 validation clips show it); empty without ``init_lora``."""
        path = getattr(self.lora, "init_lora", None)
        if path is None:
            return []
        return [(load_lora(path, module_names=[name for name, _ in model.named_modules()]), 1.0)]


def validation_prompts(family: str, conditioning: Any, chain: ValidationPrompts | None,
                       legacy: Callable[[Any], ValidationPrompt]) -> ValidationPrompts:
    """The run's validation prompts: the Validation Prompt chain, or the one prompt of ``validation_conditioning``
    (``legacy(conditioning)``), or none.

    Raises:
        TrainingError: both are connected, or the chain is another family's.
    """
    if conditioning is not None and chain is not None:
        raise TrainingError("connect either validation_conditioning (one prompt) or validation (Validation Prompt "
                            "nodes), not both.")
    if chain is not None:
        if not isinstance(chain, ValidationPrompts) or chain.family != family:
            made = getattr(chain, "family", type(chain).__name__)
            raise TrainingError(f"validation holds {made} prompts; connect the {family} Validation Prompt node.")
        return chain
    if conditioning is not None:
        return ValidationPrompts(family, (legacy(conditioning),))
    return ValidationPrompts(family)


def check_validation(plan: ValidationPlan, prompts: ValidationPrompts, vae: Any) -> None:
    """Refuse a validation that is due without a prompt or a VAE to decode it.

    Raises:
        TrainingError: naming what to connect.
    """
    if plan.active and (not prompts.prompts or vae is None):
        raise TrainingError("validation (validate_every > 0, validation steps or sample_at_start) needs a prompt "
                            "(validation, or validation_conditioning) and vae connected.")


def validation_requests(prompts: ValidationPrompts, size: tuple, request_for: Callable[[ValidationPrompt], Any],
                        encode_start_image: Callable[..., Any], vae: Any) -> list[tuple[ValidationPrompt, Any, Any]]:
    """Each validation prompt with its checked sampling request and its start image's latent.

    Args:
        prompts: the run's validation prompts.
        size: the default size, ``(width, height, frames)``, for what a prompt leaves at 0 (:meth:`ValidationPrompt.sized`).
        request_for: the family's sampling request of a sized prompt; raises ValueError for what the model cannot
            sample.
        encode_start_image: the family's ``encode_start_image(vae, image, width, height, device=...)``.
        vae: the trainer's VAE.
    Returns:
        ``(prompt, request, start)`` per prompt, where ``start()`` gives the start image's latent (encoded with
        ``vae`` on the compute device when first called, then kept), or ``start`` is None without a start image.
    Raises:
        TrainingError: ``validation prompt <n>: <what request_for refused>``.
    """
    prepared = []
    for number, prompt in enumerate(prompts.prompts, 1):
        sized = prompt.sized(*size)
        try:
            request = request_for(sized)
        except ValueError as e:
            raise TrainingError(f"validation prompt {number}: {e}") from None
        start = None if sized.start_image is None else functools.cache(
            functools.partial(_encode_start, encode_start_image, vae, sized.start_image, request))
        prepared.append((prompt, request, start))
    return prepared


def _encode_start(encode_start_image: Callable[..., Any], vae: Any, image: Any, request: Any) -> Any:
    with host.on_compute_device(vae) as device:
        return encode_start_image(vae, image, request.width, request.height, device=device)


def holdout_samples(data: Any, training: Any, to_samples: Callable[[Any], list], config: TrainConfig) -> list | None:
    """The held-out samples for the validation loss from the ``validation_data`` cache, or None.

    Raises:
        TrainingError: ``validation_loss_every`` > 0 without validation data; validation data cached with another
            text encoder or VAE than the training data.
    """
    if data is None:
        if config.validation_loss_every:
            raise TrainingError("validation_loss_every > 0 (Training Checkpoint Settings) needs held-out samples: "
                                "connect a second cached dataset of the same model to validation_data.")
        return None
    for what, attr in (("text encoder", "encoder_id"), ("VAE", "vae_id")):
        if getattr(data, attr, None) != getattr(training, attr, None):
            raise TrainingError(f"validation_data was cached with another {what} than training_data: cache both "
                                "datasets with the same loaders.")
    return to_samples(data)


def run_metadata(output_name: str, handle: Any, data: Any, plan: ValidationPlan, prompts: ValidationPrompts,
                 holdout_data: Any) -> dict[str, Any]:
    """The run's metadata (``run.json`` and the LoRA file): name, base model, dataset hash, trigger word, and the
    validation settings when clips are made."""
    metadata = {"cinetune.run": output_name, "base_model": handle.path.name, "variant": handle.variant.id,
                "dataset_hash": dataset_fingerprint(data.dataset), "trigger_word": data.dataset.trigger_word}
    if plan.active:
        metadata["validation"] = {"every": plan.every, "steps": list(plan.steps), **prompts.settings()}
    if holdout_data is not None:
        metadata["validation_dataset_hash"] = dataset_fingerprint(holdout_data.dataset)
    return metadata


def recipe_data(data: Any, cached: list, holdout_data: Any = None) -> dict[str, CachedData]:
    """The ``data`` of a run's recipe: the training samples ``cached`` (the ``CachedSample`` list the run's samples
    were made from, in training order) of the training data ``data``, and the held-out data's when connected."""
    out = {"train": CachedData.from_samples(cached, cache_dir=data.cache_dir, encoder_id=data.encoder_id,
                                            vae_id=data.vae_id)}
    if holdout_data is not None:
        out["holdout"] = CachedData.from_samples(holdout_data.cached_samples(), cache_dir=holdout_data.cache_dir,
                                                 encoder_id=holdout_data.encoder_id, vae_id=holdout_data.vae_id)
    return out


def _check_workers(gpus: int, device: torch.device, handle, plan: ValidationPlan, samples: list,
                   config: TrainConfig) -> None:
    """Refuse ``gpus`` > 1 where the run cannot be handed to worker processes (before anything is written).

    Raises:
        DistributedError: see :func:`~cinetune.training.distributed.check_local_workers` and
            :func:`~cinetune.training.distributed.check_world_divides`.
    """
    visible = torch.cuda.device_count() if device.type == "cuda" else None
    check_local_workers(gpus, device.type, visible_gpus=visible, blocks_to_swap=handle.blocks_to_swap,
                        validation_clips=plan.active)
    check_world_divides([(tuple(s.bucket), int(s.frames)) for s in samples],
                        [int(getattr(s, "repeats", 1)) for s in samples], config.batch_size, gpus)


def _interrupted(events: Events, run_dir: Path, output_name: str, since_ns: int, error: BaseException) -> None:
    """After an interruption or error: install the partial LoRA the trainer left as ``<output_name>_step<k>``
    (:func:`~cinetune.training.runs.install_partial_lora`) and send its path as the "interrupted" status (the chart
    shows it as the partial LoRA); without one, the status says what happened and where the last checkpoint is."""
    done = list_checkpoints(run_dir)
    step = done[-1][0] if done else 0
    message = f"{type(error).__name__}: {error}; the last checkpoint is in {run_dir}"
    try:
        partial = install_partial_lora(run_dir, host.model_folder("loras"), output_name, since_ns=since_ns)
    except Exception as e:  # the run's own error is what is raised; this one is only reported
        partial, message = None, f"{message} (its partial LoRA was not installed: {e})"
    events.status("interrupted", step, message if partial is None else str(partial))


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(handle, base_handle, *, node_id: str, output_name: str, config: TrainConfig, samples: list, empty: Any,
          adapter: TrainingAdapter, resume: bool, metadata: dict, plan: ValidationPlan,
          render: Callable[[int, torch.nn.Module], Any] | None, settings: Settings,
          holdout: list | None = None, recipe: RunRecipe | None = None, gpus: int = 1,
          note: str | None = None) -> io.NodeOutput:
    """Run (or reuse) the training run, install its LoRA (and EMA LoRA) and return the node's outputs: the base
    model with the LoRA applied, the LoRA's name, and the newest validation clips as the node's preview.

    ``recipe`` (the run's :class:`~cinetune.training.recipe.RunRecipe`) is written into the run folder before the
    first step, so the run can be continued headless. With ``gpus`` > 1 the run is handed to that many local worker
    processes (torchrun, FSDP2; :func:`~cinetune.training.launch.launch_workers`) whose events drive the progress
    and the chart; Cancel makes them save a checkpoint and stop. After any interruption the partial LoRA is
    installed as ``<output_name>_step<k>``. ``note`` (a line such as
    :func:`~cinetune.nodes.rules.i2v_single_frames` gives) is logged and added to the "started" status the node shows.

    Raises:
        TrainingError: refused settings (``gpus`` > 1 without a recipe, or one the workers cannot run, see
            :func:`_check_workers`); a run folder path that is a file; a LoRA of another run (or any other file)
            where this run's LoRA or EMA LoRA would be installed
            (:func:`~cinetune.training.runs.check_install_targets`); whatever the run raises (a failing worker is
            named by its rank).
    """
    run_dir = run_folder(output_name)
    installs = [output_name]
    if config.ema_decay:
        check_file_name(output_name + EMA_SUFFIX, OUTPUT_NAME, "output_name (with EMA)")
        installs.append(output_name + EMA_SUFFIX)
    loras = host.model_folder("loras")
    check_install_targets(loras, installs, output_name)  # the rule install_lora applies at the end
    device = host.compute_device()
    if gpus > 1:
        if recipe is None:
            raise TrainingError("training on several GPUs needs the run's recipe; this trainer node passes none.")
        _check_workers(gpus, device, handle, plan, samples, config)
    events = Events(node_id, output_name, config.max_steps)
    host.free_host_models()
    where = "" if gpus == 1 else f" on {gpus} {'GPUs' if device.type == 'cuda' else 'processes'}"
    summary = f"{len(samples)} samples, {config.max_steps} steps{where}"
    if note:
        host.log.warning("%s: %s", output_name, note)
    events.status("started", 0, summary if not note else f"{summary}; {note}")
    finished = finished_run(run_dir, config, metadata)
    on_written = lambda step, path: events.status("validation", step, str(path))  # noqa: E731
    started_ns = time.time_ns()
    try:
        if finished is not None:  # the same finished run (ComfyUI dropped its cached output): reuse it
            result = finished
            if recipe is not None:  # a run finished by an older version gets its recipe, so it can go on headless
                write_recipe(run_dir, recipe)
        else:
            fresh = resolve_resume(run_dir, resume) is None  # refuses to overwrite a run before anything is made
            if recipe is not None:
                write_recipe(run_dir, recipe)
            if gpus > 1:  # the workers load their own copy of the model; this one stays where it is
                result = launch_workers(run_dir, gpus, device=device.type, on_event=events.progress,
                                        check_interrupt=host.check_interrupt)
            else:
                if fresh and plan.at_start:  # the start LoRA is applied before placement, as the samplers do
                    with (torch.inference_mode(False),
                          loras_applied(handle.model, settings.start_loras(handle.model)),
                          model_on_device(handle.model, handle.blocks, device, **handle.placement())):
                        plan.start(render, run_dir, handle.model, on_written)
                with (torch.inference_mode(False),
                      model_on_device(handle.model, handle.blocks, device, **handle.placement())):
                    result = train_lora(handle.model, samples, empty, config, run_dir, adapter=adapter,
                                        device=device, resume=resume, on_event=events.progress,
                                        check_interrupt=host.check_interrupt,
                                        validate=plan.validator(render, run_dir, on_written),
                                        validate_every=plan.cadence, metadata=metadata, holdout=holdout)
    except BaseException as e:
        _interrupted(events, run_dir, output_name, started_ns, e)
        raise
    installed = install_lora(result.lora_path, loras, output_name)
    if result.ema_lora_path is not None:
        install_lora(result.ema_lora_path, loras, output_name + EMA_SUFFIX, run=output_name)
    events.status("finished", result.steps, str(installed))
    trained = base_handle.with_lora(installed.name, 1.0)
    clips = latest_validations(run_dir)
    preview = None
    if clips:
        subfolder = clips[0].parent.relative_to(host.output_directory()).as_posix()
        preview = ui.PreviewVideo([ui.SavedResult(c.name, subfolder, io.FolderType.output) for c in clips])
    return io.NodeOutput(trained, installed.name, ui=preview)
