"""Shared check for the fused LoRA projections (core.lora_fused) inside a family's DiT."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch


def lora_gradients(model: torch.nn.Module, module: ModuleType, loss: Callable[[torch.Tensor], torch.Tensor],
                   video: torch.Tensor, monkeypatch, *, fused: bool, seed: int = 3) -> dict[str, torch.Tensor]:
    """Gradients of the trainable parameters and of ``video`` for ``loss(video)`` in training mode, with the
    projections of ``module`` (the family module that imports ``fused_projections``) fused or called one by one;
    also counts the fused calls (key "fused calls")."""
    import cinetune.core.lora_fused as lora_fused

    calls = []
    apply = lora_fused._FusedProjection.apply
    monkeypatch.setattr(lora_fused._FusedProjection, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(module, "fused_projections",
                        lora_fused.fused_projections if fused else (lambda x, layers: [m(x) for m in layers]))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    video = video.clone().requires_grad_(True)
    loss(video).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["input"] = video.grad.clone()
    out["fused calls"] = torch.tensor(len(calls))
    return out


def assert_same_gradients(fused: dict[str, torch.Tensor], separate: dict[str, torch.Tensor]) -> None:
    """Equal to float32 rounding (a rank-dropout mask may zero a whole gradient)."""
    assert fused.keys() == separate.keys()  # module dropout skipped the same adapters
    for name in fused:
        assert (fused[name] - separate[name]).norm() <= 1e-5 * separate[name].norm() + 1e-12, name
