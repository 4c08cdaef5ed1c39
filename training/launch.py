"""Run or continue a training run headless, from its run folder: ``python -m cinetune.training.launch <run folder>``.

::

    python -m cinetune.training.launch output/cinetune/runs/my_lora                    # one process
    python -m cinetune.training.launch runs/my_lora --models /data/models --device cuda --max-steps 4000
    torchrun --nproc_per_node 8 -m cinetune.training.launch runs/my_lora               # 8 GPUs, FSDP2
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 \\
        -m cinetune.training.launch runs/my_lora                                      # 2 machines

The run folder's recipe (:mod:`cinetune.training.recipe`, written by the trainer node) names the model files, the
loader settings, the caches and the training settings. The launcher loads the model through its family's builder
(:func:`register_run_builder`, called by each family's ``launch`` module: ``k5/launch.py``, ``ltx2/launch.py``;
this module names no family), reads the cached samples, and calls
:func:`cinetune.training.trainer.train_lora` with ``resume=True``: it continues the newest checkpoint (or starts
the run) and writes the same checkpoints and ``lora.safetensors`` as the node. Under torchrun the ranks train one
run data-parallel (:mod:`cinetune.training.distributed`); rank 0 alone writes files.

Events go to ``run_dir/events.jsonl``, one JSON object per line, each appended with a single ``write`` on a file
opened ``O_APPEND`` (a reader sees whole lines; :func:`read_events` ignores a trailing partial one)::

    {"event": "started", "time": …, "world_size": 2, "device": "cuda:0", "resume_step": 250, "validation": false}
    {"event": "progress", "time": …, "step": 251, "max_steps": 2000, "loss": …, "loss_ema": …, "lr": …, …}
    {"event": "finished", "time": …, "steps": 2000, "lora": "…/lora.safetensors"}
    {"event": "stopped", "time": …, "message": "…"}                 # after a stop request, checkpoint saved
    {"event": "error", "time": …, "rank": 3, "error": "OutOfMemoryError", "message": "…"}

Stopping: :func:`request_stop` (or ``SIGTERM`` to the workers, which torchrun forwards) makes every rank stop before
the next optimizer step; the trainer saves a resumable checkpoint first. A stop request left from before a launch is
cleared when it starts.

Exit codes of the command: 0 finished, 1 an unexpected error, 2 bad input (run folder, models, caches, settings),
3 stopped on request. Another process (the trainer node) starts the command with :func:`launch_workers`, which
follows the events, turns its own interruption into a stop request and names the rank that failed.

Validation clips are not rendered headless (no VAE or text encoder is loaded); their settings stay in the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..core.offload import model_on_device
from .adapter import TrainingAdapter
from .checkpointing import LORA_FILE, list_checkpoints, read_state
from .config import TrainEvent, TrainingError, TrainResult
from .distributed import (SHARDING, DistributedContext, check_sharding, check_world_divides, close_distributed,
                          init_distributed, shard_frozen_blocks)
from .ema import EMA_LORA_FILE
from .recipe import RecipeError, RunRecipe, read_recipe, write_recipe
from .trainer import train_lora

__all__ = ["EVENTS_FILE", "STOP_FILE", "LOG_FILE", "BuiltRun", "StopRequested", "register_run_builder", "build_run",
           "swap_settings",
           "append_event", "read_events", "request_stop", "launch", "torchrun_command", "launch_workers", "main"]

EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop.request"

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


class StopRequested(Exception):
    """A stop was requested (stop file or SIGTERM); the trainer saved a checkpoint before this reached the caller."""


# ---------------------------------------------------------------------------------------------------------------
# Events and stop requests


def append_event(run_dir: str | os.PathLike, event: Mapping[str, Any]) -> None:
    """Append ``event`` (JSON-serialisable; ``time`` added when absent) as one line of ``run_dir/events.jsonl``."""
    line = (json.dumps({"time": time.time(), **event}, sort_keys=True, default=str) + "\n").encode("utf-8")
    path = Path(run_dir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_events(run_dir: str | os.PathLike, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete event lines of ``run_dir/events.jsonl`` from byte ``offset`` on.

    Returns:
        ``(events, next_offset)``: pass ``next_offset`` to the next call to get only newer events. A last line
        without its newline (being written) is left for the next call; a line that is not JSON is skipped.
    """
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = []
    for raw in data[:end].splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end


def request_stop(run_dir: str | os.PathLike) -> Path:
    """Ask a headless run in ``run_dir`` to stop after saving a checkpoint (its ranks see it before their next
    step). Returns the request file."""
    path = Path(run_dir) / STOP_FILE
    path.write_text(str(time.time()), encoding="utf-8")
    return path


_TERMINATE = threading.Event()


def _on_sigterm(signum, frame) -> None:
    _TERMINATE.set()


class _StopCheck:
    """The trainer's ``check_interrupt``: every rank stops at the same step when any rank saw a request."""

    def __init__(self, run_dir: Path, ctx: DistributedContext) -> None:
        self.path, self.ctx = run_dir / STOP_FILE, ctx

    def __call__(self) -> None:
        if self.ctx.any_true(_TERMINATE.is_set() or self.path.exists()):
            raise StopRequested("a stop was requested")


class _Progress:
    """Rank 0's ``on_event``: a line in events.jsonl and one on stdout per optimizer step."""

    def __init__(self, run_dir: Path, echo: bool) -> None:
        self.run_dir, self.echo = run_dir, echo

    def __call__(self, e: TrainEvent) -> None:
        append_event(self.run_dir, {"event": "progress", **dataclasses.asdict(e)})
        if self.echo:
            print(f"step {e.step}/{e.max_steps}  loss {e.loss:.5f}  ema {e.loss_ema:.5f}  lr {e.lr:.3g}  "
                  f"{e.steps_per_s:.3g} steps/s  eta {e.eta_s:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Building a run from its recipe


@dataclass
class BuiltRun:
    """What :func:`train_lora` needs, built from a recipe by the family's builder.

    Attributes:
        model: the DiT as its loader returns it (frozen, eval mode, on the CPU). adapter: the family's training
            adapter. samples, empty: the samples and empty caption for ``train_lora``. config: the run's settings.
        holdout: held-out samples (None without). blocks_to_swap, pin_memory: the loader's block-swap settings.
    """

    model: nn.Module
    adapter: TrainingAdapter
    samples: list
    empty: Any
    config: Any
    holdout: list | None = None
    blocks_to_swap: int = 0
    pin_memory: bool = True


#: A family's builder: ``recipe -> BuiltRun``.
RunBuilder = Callable[[RunRecipe], BuiltRun]
_BUILDERS: dict[str, RunBuilder] = {}


def register_run_builder(family: str, builder: RunBuilder) -> RunBuilder:
    """Make ``builder`` build the runs of model family ``family`` (replacing any earlier one); returns it."""
    _BUILDERS[family] = builder
    return builder


def _pack_root() -> Path:
    """The folder of the pack (not resolved: a symlinked custom-node folder keeps its own name)."""
    return Path(os.path.abspath(__file__)).parents[1]


def _pack_package() -> str:
    """The name the pack was imported under: ``cinetune`` when installed; inside ComfyUI the custom-node folder's
    path, which ComfyUI uses as the module name."""
    return (__package__ or "cinetune.training").rpartition(".")[0]


def _family_launch_modules() -> list[str]:
    """The pack's packages (beside this one) that have a ``launch`` module: the model families' builders."""
    root, own = _pack_root(), Path(__file__).parent.name
    return sorted(d.name for d in root.iterdir() if d.name != own and d.name.isidentifier()
                  and (d / "__init__.py").is_file() and (d / "launch.py").is_file())


def _import_family_builders() -> list[str]:
    """Import every family's ``launch`` module (each registers its builder); returns the failures as messages."""
    package = _pack_package()
    failed = []
    for name in _family_launch_modules():
        try:
            importlib.import_module(f"{package}.{name}.launch")
        except ImportError as exc:
            failed.append(f"{package}.{name}.launch: {exc}")
    return failed


def build_run(recipe: RunRecipe) -> BuiltRun:
    """Load the model, adapter, samples and settings of ``recipe`` through its family's builder.

    Builders register themselves when their family's ``launch`` module is imported (``k5/launch.py``,
    ``ltx2/launch.py``); when none is registered for the recipe's family yet, every package of the pack with a
    ``launch`` module is imported first, so the command needs no family named here.

    Raises:
        RecipeError: no builder for the recipe's family. Loader errors (CheckpointError, CacheError, …) as raised.
    """
    failed: list[str] = []
    if recipe.family not in _BUILDERS:
        failed = _import_family_builders()
    builder = _BUILDERS.get(recipe.family)
    if builder is None:
        note = f" Modules that failed to import: {'; '.join(failed)}." if failed else ""
        raise RecipeError(f"no headless builder for the model family {recipe.family!r} (known: "
                          f"{', '.join(_BUILDERS) or 'none'}); the run was written by a version of Cinetune with "
                          f"another family: update Cinetune.{note}")
    return builder(recipe)


def swap_settings(recipe: RunRecipe) -> dict[str, Any]:
    """The :class:`BuiltRun` block-swap fields from a recipe's loader settings (``blocks_to_swap``,
    ``use_pinned_memory``; none swapped and pinned by default)."""
    loader = recipe.loader
    return dict(blocks_to_swap=int(loader.get("blocks_to_swap", 0)),
                pin_memory=bool(loader.get("use_pinned_memory", True)))


# ---------------------------------------------------------------------------------------------------------------
# Launching


def _trainer_takes(name: str) -> bool:
    return name in inspect.signature(train_lora).parameters


def launch(run_dir: str | os.PathLike, *, models=None, caches: Mapping[str, str] | None = None,
           device: str | None = None, max_steps: int | None = None, sharding: str | None = None,
           ctx: DistributedContext | None = None, echo: bool = False) -> TrainResult:
    """Continue (or start) the run in ``run_dir`` from its recipe; the library side of the command.

    Args:
        run_dir: the run folder. models, caches: where moved model files and caches are (:func:`read_recipe`).
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available); used when ``ctx`` is None.
        max_steps: train to this step count instead of the recipe's (written back into the recipe, so a later
            launch continues with it). sharding: ``"fsdp"`` (default with several processes) or ``"replicate"``.
        ctx: the process's :class:`~cinetune.training.distributed.DistributedContext` (None: join torchrun's group
            or run alone, and leave it on return). echo: print a line per step on rank 0.

    Returns:
        The trainer's :class:`TrainResult` (on every rank).

    Raises:
        RecipeError: see :func:`read_recipe`; TrainingError / DistributedError: settings that cannot run (e.g.
        ``max_steps`` on an epoch-counted run, a world size that does not divide the batches, FSDP with block
        swap); StopRequested: a stop was requested (a checkpoint was saved); whatever the loaders or the trainer
        raise.
    """
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir, models=models, caches=caches)
    epochs = recipe.config.get("epochs", 0)
    if max_steps is not None and epochs:
        raise TrainingError(f"--max-steps does not apply to this run: it trains {epochs} epochs. Leave --max-steps "
                            "out.")
    own = ctx is None
    finished = False
    ctx = init_distributed(device) if own else ctx
    try:
        sharding = sharding or ("fsdp" if ctx.distributed else "replicate")
        extra: dict[str, Any] = {}
        if ctx.distributed:
            if not _trainer_takes("distributed"):
                raise TrainingError("this version's trainer cannot train on several processes yet; run one process.")
            check_sharding(sharding, int(recipe.loader.get("blocks_to_swap", 0)))
            extra["distributed"] = ctx

        def start() -> None:
            (run_dir / STOP_FILE).unlink(missing_ok=True)
            done = list_checkpoints(run_dir)
            append_event(run_dir, {"event": "started", "world_size": ctx.world_size, "device": str(ctx.device),
                                   "resume_step": done[-1][0] if done else 0, "validation": False})

        ctx.run_on_main(start, "starting the run")
        built = build_run(recipe)
        config = built.config
        if max_steps is not None:
            config = dataclasses.replace(config, max_steps=max_steps)
            ctx.run_on_main(lambda: write_recipe(run_dir, recipe.with_config(config)), "writing the recipe")
        keys = [(tuple(s.bucket), int(s.frames)) for s in built.samples]
        check_world_divides(keys, [int(getattr(s, "repeats", 1)) for s in built.samples], config.batch_size,
                            ctx.world_size)
        if built.holdout is not None:
            if not _trainer_takes("holdout"):
                raise TrainingError("this version's trainer has no held-out loss; remove the validation data.")
            extra["holdout"] = built.holdout
        blocks = built.adapter.blocks(built.model)
        if ctx.distributed and sharding == "fsdp":
            shard_frozen_blocks(built.model, blocks, ctx)
            placement = nullcontext()
        else:
            placement = model_on_device(built.model, blocks, ctx.device, blocks_to_swap=built.blocks_to_swap,
                                        pin_memory=None if built.pin_memory else False, offload_device="cpu")

        with placement:
            result = train_lora(built.model, built.samples, built.empty, config, run_dir, adapter=built.adapter,
                                device=ctx.device, resume=True,
                                on_event=_Progress(run_dir, echo) if ctx.is_main else None,
                                check_interrupt=_StopCheck(run_dir, ctx), metadata=recipe.metadata, **extra)
        if ctx.is_main:
            append_event(run_dir, {"event": "finished", "steps": result.steps, "lora": str(result.lora_path)})
        finished = True
        return result
    finally:
        if own:
            close_distributed(ctx, wait=finished)


# ---------------------------------------------------------------------------------------------------------------
# Starting the command from another process (the trainer node) and following it


def torchrun_command(run_dir: str | os.PathLike, nproc_per_node: int, *, device: str | None = None,
                     extra_args: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The command that runs ``run_dir`` on ``nproc_per_node`` local processes, and its environment.

    ``python -m torch.distributed.run --standalone --nproc_per_node N -m <package>.training.launch <run_dir> --quiet``
    with this process's interpreter. ``<package>`` is the name this pack was imported under (``cinetune`` when
    installed) or, inside ComfyUI (which imports a custom-node folder under its path), the folder's name. When the
    pack's folder has that name, the folder holding it is put first on ``PYTHONPATH``, so the workers import this
    copy of the pack.

    Raises:
        ValueError: ``nproc_per_node`` < 1.
    """
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be an integer ≥ 1; got {nproc_per_node!r}")
    package, pack = _pack_package(), _pack_root()
    if not package.isidentifier():  # imported by ComfyUI under its path: the workers import the folder by its name
        package = pack.name
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
            "-m", f"{package}.training.launch", str(run_dir), "--quiet", *(["--device", device] if device else []),
            *extra_args]
    env = dict(os.environ)
    if pack.name == package:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pack.parent), env.get("PYTHONPATH")) if p)
    return argv, env


LOG_FILE = "launch.log"


def _result(run_dir: Path) -> TrainResult:
    """The finished run's result, read from its newest checkpoint."""
    found = list_checkpoints(run_dir)
    if not found:
        raise TrainingError(f"the workers exited without writing a checkpoint into {run_dir}; see "
                            f"{run_dir / LOG_FILE}.")
    state = read_state(found[-1][1])
    ema = run_dir / EMA_LORA_FILE
    return TrainResult(run_dir / LORA_FILE, int(state["step"]), [float(x) for x in state["losses"]], found[-1][1],
                       ema_lora_path=ema if ema.is_file() else None)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def launch_workers(run_dir: str | os.PathLike, nproc_per_node: int, *, device: str | None = None,
                   extra_args: Sequence[str] = (), on_event: Callable[[TrainEvent], Any] | None = None,
                   check_interrupt: Callable[[], Any] | None = None, poll_s: float = 0.25,
                   stop_timeout_s: float = 600.0) -> TrainResult:
    """Run the command (:func:`torchrun_command`) as a child process and follow its events until it ends.

    The workers' output is appended to ``run_dir/launch.log``. Every complete ``progress`` line of
    ``events.jsonl`` written after the start is handed to ``on_event`` as a :class:`TrainEvent`;
    ``check_interrupt()`` is called between polls. When it (or ``on_event``) raises, a stop is requested
    (:func:`request_stop`), the workers save a checkpoint and exit (terminated after ``stop_timeout_s``), and the
    exception is re-raised.

    Returns:
        The :class:`TrainResult` of the finished run (read from its last checkpoint).

    Raises:
        TrainingError: the workers failed; the message names the rank that failed and its error (from the error
            events), or the end of the log when no rank could report one. StopRequested: they stopped on a stop
            request made by someone else. Whatever ``check_interrupt`` / ``on_event`` raise.
    """
    run_dir = Path(run_dir)
    argv, env = torchrun_command(run_dir, nproc_per_node, device=device, extra_args=extra_args)
    _, offset = read_events(run_dir)
    errors: list[dict[str, Any]] = []
    ended: str | None = None
    names = {f.name for f in dataclasses.fields(TrainEvent)}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                code = proc.poll()
                events, offset = read_events(run_dir, offset)
                for e in events:
                    ended = e.get("event") if e.get("event") in ("stopped", "finished") else ended
                    if e.get("event") == "error":
                        errors.append(e)
                    elif e.get("event") == "progress" and on_event is not None:
                        on_event(TrainEvent(**{k: v for k, v in e.items() if k in names}))
                if code is not None:
                    break
                if check_interrupt is not None:
                    check_interrupt()
                time.sleep(poll_s)
        except BaseException:
            request_stop(run_dir)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            raise
    # torchrun exits 1 whenever a worker exits non-zero, so the workers' own events tell what happened
    if code == EXIT_OK and ended == "finished" and not errors:
        return _result(run_dir)
    if ended == "stopped" and not errors:
        raise StopRequested(f"the run in {run_dir} stopped on a stop request; its last checkpoint is kept.")
    if errors:
        first = errors[0]
        raise TrainingError(f"training worker rank {first.get('rank')} failed: {first.get('error')}: "
                            f"{first.get('message')}" + (f" ({len(errors)} error reports; see {run_dir / LOG_FILE})"
                                                         if len(errors) > 1 else ""))
    raise TrainingError(f"the training workers exited with code {code} without reporting an error (killed, e.g. out "
                        f"of memory?); the last checkpoint in {run_dir} is usable. End of {run_dir / LOG_FILE}:\n"
                        + _tail(run_dir / LOG_FILE))


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, path = v.partition("=")
        if not sep or not key or not path:
            raise RecipeError(f"{flag} takes NAME=PATH (e.g. {flag} dit=/models/dit.safetensors); got {v!r}.")
        out[key] = path
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cinetune.training.launch",
                                description="Continue or start a Cinetune LoRA training run from its run folder "
                                            "(output/cinetune/runs/<name>), on one process or under torchrun.")
    p.add_argument("run_dir", help="the run folder (it holds recipe.json)")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="a folder holding moved model files (searched by file name; repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="ROLE=PATH",
                   help="a moved model file by role (dit, connectors) or recorded file name (repeatable)")
    p.add_argument("--cache", action="append", default=[], metavar="OLD=NEW",
                   help="a moved cache folder: the recorded folder and where it is now (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="train to step N (written into the recipe; not for epoch-counted runs)")
    p.add_argument("--sharding", choices=list(SHARDING), default=None,
                   help="with several processes: fsdp shards the base weights (default), replicate copies them")
    p.add_argument("--quiet", action="store_true", help="no line per step on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module notes); returns the exit code."""
    args = _parser().parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        print("error: --max-steps must be ≥ 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        models: Any = _pairs(args.model, "--model") or args.models or None
        if args.model and args.models:
            raise RecipeError("give moved models either as folders (--models) or as files (--model), not both.")
        launch(run_dir, models=models, caches=_pairs(args.cache, "--cache"), device=args.device,
               max_steps=args.max_steps, sharding=args.sharding, echo=not args.quiet)
        return EXIT_OK
    except StopRequested:
        if rank == 0 and run_dir.is_dir():
            append_event(run_dir, {"event": "stopped", "message": "stopped on request after saving a checkpoint"})
        print("stopped on request; the last checkpoint is in the run folder", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:
        bad_input = isinstance(exc, (ValueError, FileNotFoundError))  # TrainingError, CheckpointError, CacheError
        if run_dir.is_dir():
            append_event(run_dir, {"event": "error", "rank": rank, "error": type(exc).__name__, "message": str(exc)})
        print(f"error (rank {rank}): {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):
            print(note, file=sys.stderr)
        if not bad_input:
            raise
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    # ``python -m`` runs a second copy of this module as __main__; the families register their builders with the
    # imported one, so the command runs that one's main
    sys.exit(importlib.import_module(__spec__.name).main())
