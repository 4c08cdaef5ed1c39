"""TensorBoard event files of a training run (``run_dir/tensorboard``), written with PyTorch's
``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package; ``pip install tensorboard``).

Scalars per optimizer step (``global_step`` = the step number): ``loss/train`` (the step's loss),
``loss/train_ema`` (the reported loss EMA), ``loss/<part>`` for each named loss part (LTX-2 ``loss/video``,
``loss/audio``), ``loss/validation`` (the held-out loss, when computed), ``lr`` and ``grad_norm`` (before
clipping). The loss curves share the ``loss`` group, so TensorBoard charts the held-out loss beside the training
loss. A resumed run opens a new event file with ``purge_step`` = the first step it trains, so the steps an
interrupted process logged after its last checkpoint are hidden and the curves continue without duplicates.
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainEvent

__all__ = ["TENSORBOARD_DIR", "require_tensorboard", "TensorBoardLog"]

#: Folder of the event files in the run folder.
TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        ImportError: the ``tensorboard`` package is missing; the message has the pip install line.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("TensorBoard logging needs the tensorboard package, which is not installed: pip install "
                          "tensorboard (into the Python environment ComfyUI runs in), or turn tensorboard off.") from e
    return SummaryWriter


class TensorBoardLog:
    """The event-file writer of one :func:`~cinetune.training.trainer.train_lora` call (module notes).

    Args:
        run_dir: the run folder (events go to ``run_dir/tensorboard``).
        purge_step: for a resumed run, the first step it trains (events of that step and later from earlier
            processes are hidden); None for a new run.

    Raises:
        ImportError: as :func:`require_tensorboard`.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        writer = require_tensorboard()
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = writer(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, event: TrainEvent) -> None:
        """Write the scalars of one step's event."""
        w, step = self.writer, event.step
        w.add_scalar("loss/train", event.loss, step)
        w.add_scalar("loss/train_ema", event.loss_ema, step)
        for name, value in event.loss_terms.items():
            w.add_scalar(f"loss/{name}", value, step)
        if event.validation_loss is not None:
            w.add_scalar("loss/validation", event.validation_loss, step)
        w.add_scalar("lr", event.lr, step)
        if event.grad_norm is not None:
            w.add_scalar("grad_norm", event.grad_norm, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
