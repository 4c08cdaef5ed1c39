"""The files of a training run: checkpoint folders, the resumable state, resume resolution and checks.

Run folder layout (the same for every model family; a run started by an earlier version resumes unchanged)::

    run_dir/
        run.json                        config and metadata of the latest start
        lora.safetensors                final LoRA (save_dtype), also written at an interruption
        lora_ema.safetensors            EMA of the LoRA weights (only with ema_decay > 0)
        tensorboard/                    event files (only with tensorboard on)
        checkpoints/step_NNNNNN/
            lora.safetensors            LoRA in lora_dtype (Cinetune/ComfyUI layout, usable as a LoRA as is)
            state.pt                    everything else needed to continue exactly (keys below)

``state.pt`` (``torch.save``, read with ``weights_only=True``) holds ``format`` (:data:`STATE_FORMAT`), ``step``,
``epoch``, ``position``, ``order`` (the epoch's batches), ``generator`` (the run generator's state), ``rng`` (global
torch/NumPy/Python states, and CUDA's when initialised), ``optimizer``, ``scheduler``, ``losses`` (per-step
history), ``config`` (:meth:`~cinetune.training.config.TrainConfig.to_dict`), ``fingerprint`` (LoRA layers with
their in/out features, rank, alpha, optimizer, model config) and ``dataset`` (hash of the sample list); only when
used, ``train_weights`` (a schedule-free optimizer's train-mode LoRA parameters, ``"<path>.lora_down"``/
``".lora_up"``, while ``lora.safetensors`` holds its evaluation weights) and ``ema`` (the weight EMA,
:mod:`cinetune.training.ema`).

A checkpoint is written into a temporary folder and renamed into place, so every ``step_*`` folder is complete;
temporary folders a killed process left behind are removed at the next start.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.checkpoint import atomic_path
from ..core.safetensors_io import temporary_beside
from ..core.family import guess_model_family
from .config import ResumeError, TrainConfig, TrainingError

__all__ = ["CHECKPOINTS_DIR", "STATE_FILE", "LORA_FILE", "RUN_FILE", "STATE_FORMAT", "list_checkpoints",
           "resolve_resume", "remove_leftovers", "write_checkpoint", "read_state", "check_fingerprint",
           "global_rng_state", "set_global_rng_state", "metadata_strings"]

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
LORA_FILE = "lora.safetensors"
RUN_FILE = "run.json"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first: ``[(step, run_dir/checkpoints/step_NNNNNN), …]``
    (folders holding both ``state.pt`` and ``lora.safetensors``)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir() and (d / STATE_FILE).is_file() and (d / LORA_FILE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def resolve_resume(run_dir: Path, resume: bool | str | os.PathLike | None) -> Path | None:
    """The checkpoint folder a run continues from, or None for a fresh start.

    Raises:
        TrainingError: ``resume`` is False but the folder holds checkpoints (nothing is overwritten).
        ResumeError: a given path holds nothing to resume.
    """
    existing = list_checkpoints(run_dir)
    if resume is False or resume is None:
        if existing:
            raise TrainingError(f"{run_dir} already holds a training run (checkpoints up to step {existing[-1][0]}). "
                                "Turn resume on to continue it, or choose a new, empty run folder.")
        return None
    if resume is True:
        return existing[-1][1] if existing else None
    path = Path(resume)
    if (path / STATE_FILE).is_file() and (path / LORA_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    raise ResumeError(f"Nothing to resume at {path}: expected a run folder with {CHECKPOINTS_DIR}/step_NNNNNN/ "
                      f"or a step_NNNNNN folder holding {STATE_FILE} and {LORA_FILE}.")


def remove_leftovers(run_dir: Path) -> None:
    """Delete temporary checkpoint folders a killed process left behind (never complete ``step_*`` folders)."""
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(".step_") and (d.name.endswith(".tmp") or ".old-" in d.name):
                shutil.rmtree(d, ignore_errors=True)


def write_checkpoint(run_dir: Path, step: int, *, write_lora: Callable[[Path], Any], state: Mapping[str, Any],
                     keep: int) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically and prune to the newest ``keep`` (0 = keep all).

    Args:
        write_lora: writes the LoRA file to the path it is given. state: the ``state.pt`` content (module notes).

    Returns:
        The checkpoint folder.
    """
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = temporary_beside(final, folder=True)
    try:
        write_lora(tmp / LORA_FILE)
        with atomic_path(tmp / STATE_FILE) as state_tmp:
            torch.save(dict(state), state_tmp)
        old = None
        if final.exists():
            old = root / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for _, d in list_checkpoints(run_dir)[:-keep]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict[str, Any]:
    """``ckpt/state.pt`` as a dict.

    Raises:
        ResumeError: unreadable (the OS error), damaged or not a Cinetune training state of :data:`STATE_FORMAT`;
            the message says which file and how to go on.
    """
    path = ckpt / STATE_FILE
    go_on = f"Delete the folder {ckpt} to resume from the checkpoint before it, or start a new run folder."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ResumeError(f"Cannot read {path} ({e.strerror or e}). {go_on}") from e
    except Exception as e:  # torch raises several types for damaged or foreign pickles
        # torch's own text for these advises weights_only=False, which would only run a foreign pickle's code
        raise ResumeError(f"Cannot read {path}: the file is damaged or not a Cinetune training state "
                          f"({type(e).__name__}). {go_on}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{ckpt / STATE_FILE} is not a Cinetune training state (format "
                          f"{state.get('format') if isinstance(state, dict) else '?'}); start a new run folder.")
    return state


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def check_fingerprint(ckpt: Path, saved: Mapping[str, Any], mine: Mapping[str, Any], config: TrainConfig) -> None:
    """Refuse to resume a checkpoint trained with another rank, alpha, model/targets or optimizer.

    Args:
        saved, mine: fingerprints (``{"layers": {path: [in, out]}, "rank", "alpha", "optimizer", "model"}``) of
            the checkpoint and of this run.

    Raises:
        ResumeError: naming the difference and how to continue or start anew.
    """
    if saved.get("rank") != config.rank:
        raise ResumeError(f"Cannot resume from {ckpt}: it was trained with LoRA rank {saved.get('rank')}, this "
                          f"run asks for rank {config.rank}. Set rank to {saved.get('rank')} to continue it, or "
                          f"start a new run folder to train at rank {config.rank}.")
    if not math.isclose(float(saved.get("alpha", -1)), config.alpha):
        raise ResumeError(f"Cannot resume from {ckpt}: it was trained with LoRA alpha {saved.get('alpha'):g}, "
                          f"this run asks for {config.alpha:g}. Set alpha to {saved.get('alpha'):g} to continue "
                          "it, or start a new run folder.")
    layers, theirs = dict(mine["layers"]), dict(saved.get("layers", {}))
    only_ckpt = [p for p in theirs if p not in layers]
    only_here = [p for p in layers if p not in theirs]
    shapes = [f"{p} ({theirs[p][0]}→{theirs[p][1]} in the checkpoint, {layers[p][0]}→{layers[p][1]} here)"
              for p in theirs if p in layers and list(theirs[p]) != list(layers[p])]
    if only_ckpt or only_here or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} LoRA layers have other shapes: {_first(shapes, 2)}")
        if only_ckpt:
            parts.append(f"{len(only_ckpt)} of its layers do not exist here: {_first(only_ckpt)}")
        if only_here:
            parts.append(f"{len(only_here)} layers of this model are not in it: {_first(only_here)}")
        raise ResumeError(f"Cannot resume from {ckpt}: it was trained on another model or with other LoRA "
                          f"targets — " + "; ".join(parts) + f". The checkpoint is for "
                          f"{guess_model_family(list(theirs))}. Load the model (and targets, audio setting) it was "
                          "trained with, or start a new run folder.")
    if saved.get("optimizer") != config.optimizer:
        raise ResumeError(f"Cannot resume from {ckpt}: it was trained with the {saved.get('optimizer')!r} "
                          f"optimizer, this run asks for {config.optimizer!r} (optimizer states do not convert). "
                          f"Set optimizer to {saved.get('optimizer')!r}, or start a new run folder.")


def global_rng_state() -> dict[str, Any]:
    """The global torch, NumPy and Python RNG states (and CUDA's when initialised), ``weights_only``-loadable."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`global_rng_state` returned (CUDA only on the same number of devices)."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """LoRA file metadata as str → str (non-string values JSON-encoded)."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in dict(metadata or {}).items()}
