"""LoRA: trainable low-rank adapters on Linear layers, their injection into a model, merging and unmerged application.

Math (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, eq. 3 and the α/r
scaling of §4.1)::

    y = base(x) + m · (α / r) · (x Aᵀ) Bᵀ        A = lora_down [r, in],  B = lora_up [out, r]
    merged:  W' = W + s · (α / r) · B A           (m: runtime multiplier, s: merge strength)

Initialisation as kohya-ss/sd-scripts ``networks/lora.py`` (``LoRAModule``) and PEFT ``tuners/lora/layer.py``:
A kaiming-uniform with a = √5 (``nn.Linear``'s default), B zeros, so a fresh adapter changes nothing.

Which layers get adapters is the model family's choice: :func:`inject_lora` takes the family's target suffixes and
block prefixes (:class:`cinetune.core.family.ModelFamily` ``lora_targets`` / ``lora_within``). Reading and writing
LoRA files (layouts, key conversions, alphas) is :mod:`.lora_formats`; its public names are also importable from
here.

Decision: **fp8 merge** dequantises, adds the delta in float32 and requantises with a fresh per-tensor scale
(:func:`cinetune.core.quant.quantize_fp8`); :func:`apply_lora_unmerged` avoids that rounding.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError
from .family import guess_model_family
from .quant import FP8Linear

__all__ = [
    "LoRAError", "LoRALinear", "LoRAWeights", "inject_lora", "remove_lora", "merge_lora", "apply_lora_unmerged",
    "loras_applied", "guess_model_family",
    # from .lora_formats
    "PEFT_DEFAULT_ALPHA", "LAYOUTS", "lora_state_dict", "export_lora_state_dict", "peft_config", "save_lora",
    "load_lora",
]

# Names of .lora_formats that stay importable from this module (resolved on first use: lora_formats imports this
# module, so it cannot be imported here at load time).
_FORMAT_NAMES = frozenset({"PEFT_DEFAULT_ALPHA", "LAYOUTS", "lora_state_dict", "export_lora_state_dict",
                           "peft_config", "save_lora", "load_lora"})


def __getattr__(name: str):
    if name in _FORMAT_NAMES:
        from . import lora_formats
        return getattr(lora_formats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LoRAError(CheckpointError):
    """A LoRA cannot be read, injected or applied. The message says what is wrong and how to fix it."""


def _first(items: Iterable[str], n: int = 10) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f" … ({len(items)} in all)" if len(items) > n else f" ({len(items)} in all)")


# ---------------------------------------------------------------------------------------------------------------
# The adapter module


def _linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear-like module this file can wrap, else None."""
    if isinstance(module, (nn.Linear, FP8Linear, LoRALinear)):
        return module.in_features, module.out_features
    return None


def _param_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """A frozen Linear layer plus a trainable low-rank update.

    ``forward(x) = base(x) + multiplier · (alpha / rank) · (dropout(x) @ lora_downᵀ) @ lora_upᵀ`` (Hu et al. 2021,
    eq. 3), computed in ``x.dtype`` (the adapter parameters are cast to it per call).

    Attributes:
        base: the wrapped layer — ``nn.Linear`` (including ``CastLinear``), :class:`~cinetune.core.quant.FP8Linear`,
            or another ``LoRALinear`` (stacked adapters). Its parameters are set to ``requires_grad=False``.
        lora_down: parameter ``[rank, in_features]`` (A), kaiming-uniform a=√5 init (kohya-ss sd-scripts
            ``networks/lora.py``, PEFT ``tuners/lora/layer.py``), i.e. U(−1/√in, 1/√in).
        lora_up: parameter ``[out_features, rank]`` (B), zeros.
        rank, alpha: ``scale = alpha / rank``.
        multiplier: runtime strength (float), 1.0 by default; 0 turns the adapter off.
        dropout: ``nn.Dropout`` on the adapter input (identity when p = 0), as PEFT ``lora_dropout``.

    Args:
        base: the layer to wrap (see above).
        rank: int ≥ 1. alpha: finite float > 0.
        dropout: probability in [0, 1).
        dtype: dtype of ``lora_down``/``lora_up`` (float32 for training; initialised in float32, then cast).
        multiplier: initial multiplier.
        generator: optional ``torch.Generator`` (CPU) for a reproducible ``lora_down`` init.

    Input ``x [..., in_features]``; output ``[..., out_features]`` in the dtype the base layer returns (``x.dtype``).

    Raises:
        LoRAError: ``base`` is not a Linear-like layer; bad rank, alpha or dropout.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, multiplier: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        features = _linear_features(base)
        if features is None:
            raise LoRAError(f"LoRA can only wrap nn.Linear or FP8Linear layers, got {type(base).__name__}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoRAError(f"LoRA rank must be an integer ≥ 1, got {rank!r}.")
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise LoRAError(f"LoRA alpha must be a finite number > 0 (commonly equal to the rank), got {alpha}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}.")
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise LoRAError(f"LoRA parameters need a float dtype of 16 bits or more, got {dtype}.")
        self.in_features, self.out_features = features
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.multiplier = float(multiplier)
        device = _param_device(base)
        down = torch.empty(rank, self.in_features, dtype=torch.float32, device="cpu")
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.lora_down = nn.Parameter(down.to(device=device, dtype=dtype))
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    def innermost_base(self) -> nn.Module:
        """The original layer under any stacked adapters."""
        base = self.base
        while isinstance(base, LoRALinear):
            base = base.base
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.multiplier == 0.0:
            return y
        h = F.linear(self.dropout(x), self.lora_down.to(x.dtype))
        h = F.linear(h, self.lora_up.to(x.dtype))
        return y + (self.multiplier * self.scale) * h.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, multiplier={self.multiplier:g}")


# ---------------------------------------------------------------------------------------------------------------
# Injection


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _outer_lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """LoRALinear modules that are not themselves the base of another LoRALinear."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and not any(name == p + ".base" or name.startswith(p + ".base.")
                                                       for p, _ in found):
            found.append((name, module))
    return found


def inject_lora(model: nn.Module, *, rank: int, alpha: float, targets: Iterable[str],
                within: Iterable[str] | None, dtype: torch.dtype = torch.float32, dropout: float = 0.0,
                generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Wrap every targeted Linear of ``model`` in a fresh trainable :class:`LoRALinear` (in place).

    A module is targeted when its qualified name equals a target or ends with ``"." + target`` (PEFT-style suffix
    match) and, unless ``within`` is None, starts with one of the ``within`` prefixes. Both come from the model's
    family (:class:`cinetune.core.family.ModelFamily` ``lora_targets`` and ``lora_within``). Everything else in the
    model, including the base weights, is frozen (``requires_grad=False``); only ``lora_down``/``lora_up`` train.

    Args:
        model: the DiT (any ``nn.Module``).
        rank, alpha: adapter rank and alpha (scale = alpha / rank).
        targets: module-name suffixes, e.g. ``("attn.to_q", "ff.fc1")``.
        within: module-name prefixes the targets must live under (the block stacks); None = anywhere.
        dtype: dtype of the adapter parameters. dropout: adapter input dropout.
        generator: optional CPU generator for reproducible ``lora_down`` init (drawn in module order).

    Returns:
        ``{module_path: LoRALinear}`` in module order, e.g. ``"blocks.0.attn.to_q"``.

    Raises:
        LoRAError: the model already holds LoRA layers (call :func:`remove_lora` first); empty or non-string
            targets/prefixes; nothing matched (the message lists some Linear names of the model); a matched module
            is not a Linear; bad rank/alpha.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise LoRAError(f"targets must be non-empty module-name suffixes such as ('attn.to_q', 'ff.fc1') (the model "
                        f"family's lora_targets), got {targets!r}.")
    prefixes = None if within is None else ((within,) if isinstance(within, str) else tuple(within))
    if prefixes is not None and not all(isinstance(p, str) and p for p in prefixes):
        raise LoRAError(f"within must be None or non-empty module-name prefixes (the model family's lora_within), "
                        f"got {prefixes!r}.")
    existing = _outer_lora_modules(model)
    if existing:
        raise LoRAError(f"The model already has {len(existing)} LoRA layers (e.g. {existing[0][0]}); call "
                        "remove_lora(model) (or merge them) before injecting new ones.")
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if _linear_features(module) is None:
            raise LoRAError(f"{name} matches a LoRA target but is a {type(module).__name__}, not a Linear layer; "
                            "remove that suffix from targets.")
        chosen.append(name)
    if not chosen:
        linears = [n for n, m in model.named_modules() if _linear_features(m) is not None]
        raise LoRAError(f"No Linear layer of the model matches the LoRA targets {list(targets)}"
                        + (f" under {list(prefixes)}" if prefixes is not None else "")
                        + f". The model's Linear layers are: {_first(linears, 8)}. Pass targets/within that "
                        "name them.")
    model.requires_grad_(False)
    modules: dict[str, LoRALinear] = {}
    for name in chosen:
        wrapped = LoRALinear(model.get_submodule(name), rank, alpha, dropout=dropout, dtype=dtype,
                             generator=generator)
        _replace(model, name, wrapped)
        modules[name] = wrapped
    return modules


def remove_lora(model: nn.Module) -> None:
    """Put the original layers back in place of every :class:`LoRALinear` (stacked adapters included).

    Adapters are dropped, not merged (use :func:`merge_lora` to keep their effect). A model without LoRA layers is
    left unchanged.
    """
    for name, module in _outer_lora_modules(model):
        _replace(model, name, module.innermost_base())




# ---------------------------------------------------------------------------------------------------------------
# Weights in memory


@dataclass
class LoRAWeights:
    """A LoRA independent of any model or file layout.

    Attributes:
        layers: module path (official dotted name, no prefix) → ``(down [rank, in], up [out, rank], alpha)``;
            tensors as stored (any float dtype), alpha a float (scale = alpha / rank).
        format: the layout read: ``"comfyui"``, ``"kohya"``, ``"peft"``, ``"diffusers"``, ``"bare"``, or
            ``"modules"`` (made from live adapters).
        metadata: the file's safetensors metadata (str → str) updated with the ``metadata`` passed to
            :func:`load_lora` (``trigger`` holds the official LoRAs' trigger word).
        alpha_source: where the alphas came from: ``"file"``, ``"config"``, ``"default_alpha"``, ``"peft-default"``,
            ``"rank"`` (comma-joined when layers differ).
    """

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    format: str = "modules"
    metadata: dict[str, str] = field(default_factory=dict)
    alpha_source: str = "file"

    @classmethod
    def from_modules(cls, modules: Mapping[str, LoRALinear]) -> "LoRAWeights":
        """Detached copies of the adapters of :func:`inject_lora`'s result (dtype kept)."""
        layers = {}
        for path, m in modules.items():
            if not isinstance(m, LoRALinear):
                raise LoRAError(f"{path} is a {type(m).__name__}, not a LoRALinear.")
            layers[path] = (m.lora_down.detach().clone(), m.lora_up.detach().clone(), float(m.alpha))
        return cls(layers, "modules")

    def ranks(self) -> set[int]:
        """The distinct ranks of the layers."""
        return {down.shape[0] for down, _, _ in self.layers.values()}



# ---------------------------------------------------------------------------------------------------------------
# Applying


def _targets(model: nn.Module, weights: LoRAWeights) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, float]]:
    """Look up and shape-check every layer before anything is changed."""
    if not isinstance(weights, LoRAWeights):
        raise LoRAError(f"Expected LoRAWeights (from load_lora), got {type(weights).__name__}.")
    found, missing = [], []
    modules = dict(model.named_modules())
    for path, (down, up, alpha) in weights.layers.items():
        module = modules.get(path)
        if module is None:
            missing.append(path)
            continue
        features = _linear_features(module)
        if features is None:
            raise LoRAError(f"LoRA layer {path} targets a {type(module).__name__}, not a Linear layer.")
        in_f, out_f = features
        if (up.shape[0], down.shape[1]) != (out_f, in_f):
            raise LoRAError(
                f"LoRA layer {path} does not fit the model: the LoRA update is [out, in] = "
                f"{[up.shape[0], down.shape[1]]} but the model's weight is {[out_f, in_f]}. The LoRA was trained "
                "for a model of another size (e.g. a larger or smaller variant of the same family); use a LoRA made "
                "for this model.")
        found.append((path, module, down, up, alpha))
    if missing:
        raise LoRAError(f"{len(missing)} LoRA layers name no module of this model: {_first(missing)}. The LoRA seems "
                        f"to be for {guess_model_family(missing)}, the model is "
                        f"{guess_model_family(modules)}. Use a LoRA made for this model.")
    return found


def check_lora_fits(model: nn.Module, weights: LoRAWeights, source: str) -> None:
    """Check that every layer of a LoRA names a Linear layer of ``model`` with matching shapes, before it is used
    (so a wrong LoRA fails in the loader that chose it, not later in a sampler).

    Raises:
        LoRAError: naming ``source`` (the LoRA file) and the first layer that does not fit, or the layers that name
            no module (with the family the LoRA seems to be for).
    """
    try:
        _targets(model, weights)
    except LoRAError as e:
        raise LoRAError(f"{source}: {e}") from None


def _check_strength(strength: float) -> float:
    strength = float(strength)
    if not math.isfinite(strength):
        raise LoRAError(f"LoRA strength must be a finite number, got {strength}.")
    return strength


@torch.no_grad()
def merge_lora(model: nn.Module, weights: LoRAWeights, strength: float = 1.0) -> int:
    """Add a LoRA into the model's weights: ``W += strength · (alpha / rank) · up @ down`` (in place).

    The sum is formed in float32 and written back in the weight's dtype. For
    :class:`~cinetune.core.quant.FP8Linear` the weight is dequantised (``q · scale``), the delta added in float32,
    and the result requantised with fresh scales in the layer's own layout (per tensor or block-wise,
    :meth:`~cinetune.core.quant.FP8Linear.requantize_`) — one more fp8 rounding (relative error ≤ 2⁻⁴ per element);
    :func:`apply_lora_unmerged` avoids it. A layer that is a
    :class:`LoRALinear` is merged into its innermost base. All layers are checked before any weight changes.

    Args:
        model: module whose submodule paths are the LoRA's layer paths.
        weights: from :func:`load_lora` (or :meth:`LoRAWeights.from_modules`).
        strength: finite float; the update is linear in it.

    Returns:
        Number of layers merged.

    Raises:
        LoRAError: a layer names no module (lists them and the model the LoRA seems to be for), targets a
            non-Linear, or its shape differs from the model's (names the layer and both shapes).
    """
    strength = _check_strength(strength)
    found = _targets(model, weights)
    for _path, module, down, up, alpha in found:
        base = module.innermost_base() if isinstance(module, LoRALinear) else module
        weight = base.weight
        delta = (up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)) * (
            strength * alpha / down.shape[0])
        if isinstance(base, FP8Linear):
            base.requantize_(base.dequantized_weight(torch.float32) + delta)
        else:
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(found)


def apply_lora_unmerged(model: nn.Module, weights: LoRAWeights, strength: float = 1.0) -> dict[str, LoRALinear]:
    """Apply a LoRA without touching the base weights: wrap each layer in a frozen :class:`LoRALinear`.

    The adapter tensors are copied to the layer's device in their stored dtype (``requires_grad=False``) and used at
    ``multiplier = strength``; change a module's ``multiplier`` later to retune, :func:`remove_lora` to drop all
    adapters. Layers that already are LoRALinear get the new adapter stacked on top. Exact for fp8 bases (no
    requantisation), at the cost of two small matmuls per layer and call.

    Args:
        model: module whose submodule paths are the LoRA's layer paths (changed in place).
        weights: from :func:`load_lora`. strength: finite float.

    Returns:
        ``{path: LoRALinear}`` of the new wrappers.

    Raises:
        LoRAError: as :func:`merge_lora`.
    """
    strength = _check_strength(strength)
    found = _targets(model, weights)
    out: dict[str, LoRALinear] = {}
    for path, module, down, up, alpha in found:
        dtype = down.dtype if down.dtype.itemsize >= 2 else torch.float32
        wrapped = LoRALinear(module, down.shape[0], alpha, dtype=dtype, multiplier=strength)
        with torch.no_grad():
            wrapped.lora_down.copy_(down)
            wrapped.lora_up.copy_(up)
        wrapped.lora_down.requires_grad_(False)
        wrapped.lora_up.requires_grad_(False)
        _replace(model, path, wrapped)
        out[path] = wrapped
    return out


@contextmanager
def loras_applied(model: nn.Module, loras: Iterable[tuple[LoRAWeights, float]]):
    """Apply LoRAs unmerged (:func:`apply_lora_unmerged`) for the body, then remove every LoRA wrapper again, also
    when the body raises. The base weights are never modified, so a shared model stays clean.

    Args:
        model: the network. loras: ``(weights, strength)`` pairs, applied in order (stacked).
    Raises:
        LoRAError: as :func:`apply_lora_unmerged` (nothing stays applied).
    """
    try:
        for weights, strength in loras:
            apply_lora_unmerged(model, weights, strength)
        yield model
    finally:
        remove_lora(model)
