"""Materialise a model built on the meta device from a checkpoint selection: weight dtypes, fp8 layers, block buffers.

One loader step shared by every family's DiT loader. The family builds its model on the meta device with the
official module names, selects its tensors in the file (:meth:`cinetune.core.checkpoint.Checkpoint.select`) and
hands both here with its fp8 keep rule and its block lists; this module decides each tensor's target dtype, swaps
the Linear layers that will hold fp8 codes for :class:`~cinetune.core.quant.FP8Linear`, reads the file tensor by
tensor (never memory-mapped) and assigns the tensors to the model.

Weight dtypes (the loaders' ``weight_dtype`` choice):

- ``"default"``: each tensor as stored; layers the file stores in fp8 (any layout
  :attr:`~cinetune.core.checkpoint.Checkpoint.fp8` reads) become ``FP8Linear`` with their codes and scales unchanged.
- ``"bf16"``/``"fp16"``/``"fp32"``: every float tensor cast, fp8 layers dequantised (``W = q·s`` rounded once).
- ``"fp8_e4m3fn"``: stored fp8 layers kept; every other Linear weight for which ``keep(name)`` is False quantised
  with one scale per tensor; the rest as stored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, TensorInfo
from .offload import host_tensors
from .quant import FP8Linear, check_fp8_device, is_fp8_dtype, quantize_linear_weights_fp8

WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn}
_HIGH_PRECISION = (torch.bfloat16, torch.float16, torch.float32)


def check_weight_dtype(weight_dtype: str) -> torch.dtype | None:
    """The target of a ``weight_dtype`` choice (None = as stored).

    Raises:
        ValueError: not one of :data:`WEIGHT_DTYPES`.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {weight_dtype!r}")
    return WEIGHT_DTYPES[weight_dtype]


def block_buffers(plan: Mapping[str, tuple[tuple[int, ...], torch.dtype]], block_prefixes: Sequence[str]
                  ) -> dict[str, torch.Tensor]:
    """One host buffer per block in block swap's master layout (:func:`~cinetune.core.offload.host_tensors`), as
    read destinations for the block's tensors, so block swap takes the loaded memory over instead of copying it.

    Args:
        plan: output name → (shape, dtype), as :meth:`Checkpoint.plan` gives it.
        block_prefixes: one prefix per block, e.g. ``"transformer_blocks.0."``.
    """
    views: dict[str, torch.Tensor] = {}
    for prefix in block_prefixes:
        views.update(host_tensors({k: v for k, v in plan.items() if k.startswith(prefix)}))
    return views


def load_weights(model: nn.Module, ckpt: Checkpoint, names: Sequence[str], *, weight_dtype: str,
                 keep: Callable[[str], bool], block_prefixes: Sequence[str] = (),
                 device: str | torch.device = "cpu") -> None:
    """Read ``names`` from ``ckpt`` into ``model`` (built on the meta device), converting as ``weight_dtype`` says.

    Args:
        model: the model on the meta device; its Linear layers are replaced by ``FP8Linear`` where fp8 codes go.
        ckpt: the selection of the file holding the model's tensors under the model's own names.
        names: the model's tensors to read (every key of ``model.state_dict()``, scales excluded).
        weight_dtype: see the module docstring.
        keep: the family's fp8 keep rule: True for Linear layers that stay in high precision under
            ``"fp8_e4m3fn"`` (its module path, e.g. ``"transformer_blocks.0.attn1.to_q"``).
        block_prefixes: prefixes of the blocks (``"<list>.<i>."``) whose CPU tensors share one buffer each.
        device: where the weights go.

    Raises:
        ValueError: unknown ``weight_dtype``.
        FP8DeviceError: fp8 weights would be kept on a device that cannot cast float8.
        CheckpointError: fp8 weights on layers that are not Linear, and every read problem of
            :meth:`Checkpoint.iter_load` (truncated file, not enough memory, …), each with what to do.
    """
    target = check_weight_dtype(weight_dtype)
    scheme = ckpt.fp8
    modules = dict(model.named_modules())
    not_linear = [f"{layer.weight} ({type(modules.get(layer.layer)).__name__})" for layer in scheme.layers.values()
                  if not isinstance(modules.get(layer.layer), nn.Linear)]
    if not_linear:
        raise CheckpointError(f"{ckpt.source}: fp8 weights with scales are for Linear layers, but these sit in other "
                              f"modules: {', '.join(not_linear[:5])}. The file was converted wrongly; use the bf16 "
                              "file.")
    stored = {layer.layer for layer in scheme.layers.values()} if target not in _HIGH_PRECISION else set()
    if stored:
        quantize_linear_weights_fp8(model, keep=lambda name: name not in stored)  # meta: structure only
    quantised: set[str] = set()
    if target == torch.float8_e4m3fn:
        quantize_linear_weights_fp8(model, keep=keep)
        quantised = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, FP8Linear) and n not in stored}
    device = torch.device(device)
    if stored or quantised or (target is None and any(is_fp8_dtype(ckpt.infos[n].dtype) for n in names)):
        check_fp8_device(device)

    def policy(name: str, info: TensorInfo) -> torch.dtype | None:
        if name in quantised:
            return torch.float8_e4m3fn
        if name in scheme.layers:
            return None if scheme.layers[name].layer in stored else target
        return target if target in _HIGH_PRECISION else None

    allocate = None
    if device.type == "cpu" and block_prefixes:
        buffers = block_buffers(ckpt.plan(names, dtype=policy), block_prefixes)
        allocate = lambda name, shape, dtype: buffers.get(name)  # noqa: E731
    state = dict(ckpt.iter_load(names, dtype=policy, device=device, allocate=allocate))
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model with these stored weights computes in: bf16 where the weights are bf16 or fp8, fp16 for
    fp16-only weights, fp32 otherwise."""
    dtypes = {p.dtype for p in model.parameters()}
    if torch.float16 in dtypes and torch.bfloat16 not in dtypes:
        return torch.float16
    if dtypes & {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}:
        return torch.bfloat16
    return torch.float32
