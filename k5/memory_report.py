"""The text users see for a Kandinsky 5 memory estimate (:func:`cinetune.k5.memory.estimate_k5_memory`): the peak
and its parts, what block swap keeps in CPU memory, the settings, and whether it fits."""

from __future__ import annotations

from ..core.memory import GB, MemoryEstimate

_NOT_SCANNED = object()  # format_k5_estimate without a block-swap search
_NABLA_PATH_TEXT = {
    "flex compiled": "compiled FlexAttention (dropped blocks skipped)",
    "gathered": "gathered block-sparse path, no compiler needed (dropped blocks skipped)",
    "masked dense": "masked dense path (exact, but slower than full attention)",
}


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def format_k5_estimate(est: MemoryEstimate, *, available_bytes: int | None = None,
                       fitting_swap: tuple[int, MemoryEstimate] | None | object = _NOT_SCANNED, **settings) -> str:
    """Short text for users: the peak and its parts on the first line, then what block swap keeps in CPU memory,
    the settings, and whether it fits ``available_bytes``, e.g.::

        Estimated peak GPU memory: 21.3 GB (weights 9.6 GB resident + 1.2 GB swap ring, activations 9.8 GB,
        LoRA + gradients + optimizer 0.7 GB)
        Block swap keeps 17.2 GB of weights in CPU memory.
        Settings: Pro, 512×512, 49 frames (13,312 tokens), fp8_e4m3fn weights, training, 40 blocks swapped.

    Args:
        est: from :func:`~cinetune.k5.memory.estimate_k5_memory`.
        available_bytes: free device memory (e.g. ``torch.cuda.mem_get_info()[0]``); adds a fits / does not fit line.
        fitting_swap: the result of :func:`~cinetune.k5.memory.smallest_fitting_swap` when the estimate does not
            fit: the line then names the ``blocks_to_swap`` that would fit, or (None) says that no block swap is
            enough.
        settings: shown on the settings line: ``model`` (a name), ``width``, ``height``, ``frames``, ``tokens``,
            ``weight_dtype``, ``training``, ``cfg``, ``blocks_to_swap``, ``lora_rank``, ``device_type``; other keys
            as ``key=value``. ``nabla_path`` (a ``core.attention.BLOCK_SPARSE_PATHS`` name, or None without NABLA)
            adds a line saying how NABLA attention runs.

    Returns:
        Lines joined by ``\\n`` (GB = 10⁹ bytes, one decimal).
    """
    cpu = settings.get("device_type") == "cpu"
    weights = f"weights {_gb(est.resident_weights)} resident"
    if est.swap_ring:
        weights += f" + {_gb(est.swap_ring)} swap ring"
    parts = [weights, f"activations {_gb(est.activations + est.attention_workspace)}"]
    if est.lora or est.gradients or est.optimizer_state:
        label = "LoRA + gradients + optimizer" if est.training else "LoRA"
        parts.append(f"{label} {_gb(est.lora + est.gradients + est.optimizer_state)}")
    if est.overhead:
        parts.append(f"other {_gb(est.overhead)}")
    where = "memory (CPU)" if cpu else "GPU memory"
    lines = [f"Estimated peak {where}: {_gb(est.total)} ({', '.join(parts)})"]
    if est.host_bytes:
        line = f"Block swap keeps {_gb(est.host_bytes)} of weights in CPU memory"
        lines.append(line + (f" (the same memory here: {_gb(est.total + est.host_bytes)} in all)." if cpu else "."))
    shown = []
    s = dict(settings)
    s.pop("device_type", None)
    nabla_path = s.pop("nabla_path", None)
    if "model" in s:
        shown.append(str(s.pop("model")))
    if "width" in s and "height" in s:
        shown.append(f"{s.pop('width')}×{s.pop('height')}")
    if "frames" in s:
        frames = s.pop("frames")
        tok = s.pop("tokens", None)
        shown.append(f"{frames} frames" + (f" ({tok:,} tokens)" if isinstance(tok, int) else ""))
    if "weight_dtype" in s:
        shown.append(f"{s.pop('weight_dtype')} weights")
    if "training" in s:
        training = s.pop("training")
        cfg = s.pop("cfg", None)
        shown.append("training" if training else ("inference with CFG (two forwards in turn)" if cfg
                                                  else "inference"))
    if s.get("lora_rank"):
        shown.append(f"LoRA rank {s.pop('lora_rank')}")
    s.pop("lora_rank", None)
    if s.get("blocks_to_swap"):
        shown.append(f"{s.pop('blocks_to_swap')} blocks swapped")
    s.pop("blocks_to_swap", None)
    shown += [f"{k}={v}" for k, v in s.items()]
    if shown:
        lines.append("Settings: " + ", ".join(shown) + ".")
    if nabla_path is not None:
        lines.append(f"NABLA attention: {_NABLA_PATH_TEXT.get(nabla_path, nabla_path)}.")
    if available_bytes is not None:
        if est.total <= available_bytes:
            lines.append(f"Fits in the {_gb(available_bytes)} available.")
        else:
            short = f"Does not fit in the {_gb(available_bytes)} available (short by {_gb(est.total - available_bytes)})"
            if isinstance(fitting_swap, tuple):
                n, fitting = fitting_swap
                lines.append(f"{short}: set blocks_to_swap to {n} or more on the model loader (estimated peak "
                             f"{_gb(fitting.total)}, {_gb(fitting.host_bytes)} of weights in CPU memory).")
            elif fitting_swap is None:
                lines.append(f"{short}, even with every block swapped: load fp8 weights, or lower the resolution or "
                             "frame count.")
            else:
                lines.append(f"{short}: swap more blocks, load fp8 weights, or lower the resolution or frame count.")
    if not cpu and not est.overhead:
        lines.append("Add about 0.5 GB for the CUDA context and kernel workspaces.")
    return "\n".join(lines)
