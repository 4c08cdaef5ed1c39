"""LoRA: trainable low-rank adapters on Linear layers, their injection into a model, merging and unmerged application.

Math (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, eq. 3 and the α/r
scaling of §4.1)::

    y = base(x) + m · (α / r) · (x Aᵀ) Bᵀ        A = lora_down [r, in],  B = lora_up [out, r]
    merged:  W' = W + s · (α / r) · B A           (m: runtime multiplier, s: merge strength)

Initialisation as kohya-ss/sd-scripts ``networks/lora.py`` (``LoRAModule``) and PEFT ``tuners/lora/layer.py``:
A kaiming-uniform with a = √5 (``nn.Linear``'s default), B zeros, so a fresh adapter changes nothing.

Which layers get adapters is the model family's choice: :func:`inject_lora` takes the family's target suffixes and
block prefixes (:class:`cinetune.core.family.ModelFamily` ``lora_targets`` / ``lora_within``), optionally replaced
or narrowed by regular expressions over module paths (:func:`lora_candidates`). Reading and writing LoRA files
(layouts, key conversions, alphas) is :mod:`.lora_formats`; its public names are also importable from here.

Decisions:

- **fp8 merge** dequantises, adds the delta in float32 and requantises with a fresh per-tensor scale
  (:func:`cinetune.core.quant.quantize_fp8`); :func:`apply_lora_unmerged` avoids that rounding.
- **Dropouts** follow kohya-ss/musubi-tuner ``src/musubi_tuner/networks/lora.py`` (``LoRAModule.forward``):
  ``dropout`` on the down-projection output, ``rank_dropout`` masks whole ranks per sample (scale × 1/(1−p)),
  ``module_dropout`` skips the adapter for the call. The masks come from the global generator of the input's
  device and the module-dropout draw from the global CPU generator (as musubi-tuner; no device synchronisation), so
  ``torch.utils.checkpoint`` (which restores both states) recomputes the same masks.
- **Include/exclude patterns** are matched with ``re.match`` (anchored at the start of the path). Include patterns,
  when given, select the layers instead of the family's targets, and exclude patterns are applied last, so
  "include attn, exclude block 0" works. musubi-tuner instead lets include rescue what exclude removed (its idiom
  "exclude ``.*``, include X" is written here as include X alone).
- **The forward** runs on the 2-D ``[tokens, features]`` layout and adds ``c · h Bᵀ`` into the base output with one
  GEMM (``addmm_``, the scale as the GEMM's alpha) instead of a matmul, a scale and an add: two fewer kernels over
  the output and no three output-sized temporaries; in the backward the gradient is not scaled over the output
  either.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError
from .family import guess_model_family
from .quant import FP8Linear

if TYPE_CHECKING:
    from .family import LoRAKeyGrammar

__all__ = [
    "LoRAError", "LoRALinear", "LoRAWeights", "inject_lora", "lora_candidates", "init_lora_from_file", "remove_lora",
    "merge_lora", "apply_lora_unmerged", "loras_applied", "guess_model_family",
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


def _check_settings(rank: int, alpha: float, dropout: float, rank_dropout: float, module_dropout: float,
                    dtype: torch.dtype) -> float:
    """Validate adapter settings (the messages say the valid range); returns alpha as a float."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"LoRA rank must be an integer ≥ 1, got {rank!r}.")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"LoRA alpha must be a finite number > 0 (commonly equal to the rank), got {alpha}.")
    for name, p, closed in (("dropout", dropout, False), ("rank_dropout", rank_dropout, False),
                            ("module_dropout", module_dropout, True)):
        try:
            value = float(p)
        except (TypeError, ValueError):
            value = math.nan
        if not (0.0 <= value < 1.0 or (closed and value == 1.0)):
            raise LoRAError(f"LoRA {name} must be a probability in {'[0, 1]' if closed else '[0, 1)'} (0 = off), "
                            f"got {p!r}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise LoRAError(f"LoRA parameters need a float dtype of 16 bits or more, got {dtype}.")
    return alpha


def _add_up_projection(y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, c: float) -> torch.Tensor:
    """``y + c · h @ upᵀ`` for ``y [N, out]``, ``h [N, r]``, ``up [out, r]`` (cast to ``h.dtype``).

    When the dtypes agree the product is accumulated into ``y`` in place by one GEMM with ``beta = 1, alpha = c``
    (``addmm_``). ``y`` is a fresh 2-D output of the base layer (not a view, so autograd needs no copy of it), and a
    Linear's backward does not use its output. Otherwise the out-of-place sum.
    """
    up = up.to(h.dtype)
    if y.dtype == h.dtype:
        return y.addmm_(h, up.t(), alpha=c)
    return y + c * F.linear(h, up).to(y.dtype)


class LoRALinear(nn.Module):
    """A frozen Linear layer plus a trainable low-rank update.

    ``forward(x) = base(x) + multiplier · (alpha / rank) · (x @ lora_downᵀ) @ lora_upᵀ`` (Hu et al. 2021, eq. 3),
    computed in ``x.dtype`` (the adapter parameters are cast to it per call). In training mode (``module.training``)
    the dropouts of kohya-ss/musubi-tuner ``src/musubi_tuner/networks/lora.py`` (``LoRAModule.forward``) apply, with
    ``h = x @ lora_downᵀ``:

    - ``module_dropout`` p: with probability p (one draw of the global CPU generator per call) the adapter is skipped
      and the output is ``base(x)``;
    - ``dropout`` p: ``h = F.dropout(h, p)`` (zeroes elements, scales the rest by 1/(1−p));
    - ``rank_dropout`` p: a mask ``[B, 1, …, 1, rank]`` (one per sample and rank, shared by the sample's tokens; for
      2-D inputs one per row) keeps each rank with probability 1−p, and the scale becomes
      ``multiplier · alpha / rank / (1 − p)``.

    The masks are drawn from the global generator of ``x``'s device; ``torch.utils.checkpoint`` restores that state
    and the CPU one before recomputing, so a recomputed forward uses the same masks. With all dropouts 0 (or in
    eval mode) nothing is drawn.

    Attributes:
        base: the wrapped layer — ``nn.Linear`` (including ``CastLinear``), :class:`~cinetune.core.quant.FP8Linear`,
            or another ``LoRALinear`` (stacked adapters). Its parameters are set to ``requires_grad=False``.
        lora_down: parameter ``[rank, in_features]`` (A), kaiming-uniform a=√5 init (kohya-ss sd-scripts
            ``networks/lora.py``, PEFT ``tuners/lora/layer.py``), i.e. U(−1/√in, 1/√in).
        lora_up: parameter ``[out_features, rank]`` (B), zeros.
        rank, alpha: ``scale = alpha / rank``.
        multiplier: runtime strength (float), 1.0 by default; 0 turns the adapter off.
        dropout, rank_dropout, module_dropout: the probabilities above (floats, 0 = off).

    Args:
        base: the layer to wrap (see above).
        rank: int ≥ 1. alpha: finite float > 0.
        dropout, rank_dropout: probabilities in [0, 1). module_dropout: probability in [0, 1].
        dtype: dtype of ``lora_down``/``lora_up`` (float32 for training; initialised in float32, then cast).
        multiplier: initial multiplier.
        generator: optional ``torch.Generator`` (CPU) for a reproducible ``lora_down`` init.

    Input ``x [..., in_features]``; output ``[..., out_features]`` in the dtype the base layer returns (``x.dtype``).
    The base layer runs on ``x`` flattened to ``[tokens, in_features]`` and its output tensor is reused for the
    result (the update is added in place).

    Raises:
        LoRAError: ``base`` is not a Linear-like layer; bad rank, alpha or dropout probabilities.
        RuntimeError: (forward) the input's last dimension is not ``in_features``.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, dtype: torch.dtype = torch.float32, multiplier: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        features = _linear_features(base)
        if features is None:
            raise LoRAError(f"LoRA can only wrap nn.Linear or FP8Linear layers, got {type(base).__name__}.")
        alpha = _check_settings(rank, alpha, dropout, rank_dropout, module_dropout, dtype)
        self.in_features, self.out_features = features
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.multiplier = float(multiplier)
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        device = _param_device(base)
        down = torch.empty(rank, self.in_features, dtype=torch.float32, device="cpu")
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.lora_down = nn.Parameter(down.to(device=device, dtype=dtype))
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))

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
        c = self.multiplier * self.scale
        if c == 0.0:
            return self.base(x)
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"LoRALinear takes inputs [..., {self.in_features}], got {list(x.shape)}.")
        lead = x.shape[:-1]
        # The GEMMs' own 2-D layout (a view for contiguous x, as inside F.linear): the base output is then a plain
        # tensor that the update can be accumulated into without autograd copying it.
        x = x.reshape(-1, self.in_features)
        y = self.base(x)
        if self.training and (self.dropout or self.rank_dropout or self.module_dropout):
            h, c = self._down_with_dropout(x, lead, c)
        else:
            h = F.linear(x, self.lora_down.to(x.dtype))
        if h is not None:
            y = _add_up_projection(y, h, self.lora_up, c)
        return y if len(lead) == 1 else y.reshape(*lead, self.out_features)

    def _down_with_dropout(self, x: torch.Tensor, lead: torch.Size, c: float) -> tuple[torch.Tensor | None, float]:
        """``(h, c)`` for ``x [N, in]`` under the training-mode dropouts (class docstring); h None = skipped."""
        if self.module_dropout and torch.rand(()) < self.module_dropout:
            return None, c
        h = F.linear(x, self.lora_down.to(x.dtype))
        if self.dropout:
            h = F.dropout(h, self.dropout, training=True)
        if self.rank_dropout:
            shape = (lead[0],) + (1,) * (len(lead) - 1) + (self.rank,) if lead else (self.rank,)
            keep = torch.rand(shape, device=h.device) > self.rank_dropout
            h = (h.view(*lead, self.rank) * keep.to(h.dtype)).reshape(-1, self.rank)
            c = c / (1.0 - self.rank_dropout)
        return h, c

    def extra_repr(self) -> str:
        drops = "".join(f", {n}={getattr(self, n):g}" for n in ("dropout", "rank_dropout", "module_dropout")
                        if getattr(self, n))
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, multiplier={self.multiplier:g}{drops}")


# ---------------------------------------------------------------------------------------------------------------
# Selection and injection


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


def _layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without the layers wrapped inside a LoRALinear (its path stands for them)."""
    out, inside = [], None  # named_modules lists a module's descendants right after it
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, LoRALinear) else None
        out.append((name, module))
    return out


def _compile_patterns(patterns: Iterable[str], kind: str) -> list[tuple[str, re.Pattern]]:
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    compiled = []
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise LoRAError(f"LoRA {kind} patterns must be non-empty regular expressions, got {p!r} (an empty pattern "
                            "would match every layer); remove blank entries.")
        try:
            compiled.append((p, re.compile(p)))
        except re.error as e:
            raise LoRAError(f"LoRA {kind} pattern {p!r} is not a valid regular expression ({e}); escape literal "
                            r"dots as '\.' and check brackets.") from e
    return compiled


def lora_candidates(model: nn.Module, *, targets: Iterable[str], within: Iterable[str] | None,
                    include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """The module paths :func:`inject_lora` would wrap, for checks before a run (nothing is changed).

    Selection (module paths as ``named_modules`` gives them, e.g. ``"transformer_blocks.0.attn1.to_q"``):

    1. the scope is every Linear-like layer (``nn.Linear``, ``FP8Linear``, an existing ``LoRALinear``) whose path
       starts with one of ``within`` (anywhere when None);
    2. without ``include``: the layers whose path equals a target or ends with ``"." + target`` (PEFT-style suffix
       match, the family's ``lora_targets``); with ``include``: the layers of the scope matched by any include
       pattern (``re.match``, i.e. anchored at the start — musubi-tuner's module-pattern convention; write
       ``.*to_q`` for a suffix, end with ``$`` for an exact path);
    3. the layers matched by any ``exclude`` pattern are removed.

    Args:
        model: the DiT. targets: module-name suffixes. within: module-name prefixes, or None.
        include, exclude: regular expressions (strings; a single string is one pattern).

    Returns:
        The selected paths in module order.

    Raises:
        LoRAError: empty or non-string targets/prefixes; a pattern that is empty or not a valid regular expression;
            a pattern that matches no layer of the scope (names each such pattern and shows a few paths of the
            scope); a target suffix that names a non-Linear module; nothing selected (lists some Linear paths).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise LoRAError(f"targets must be non-empty module-name suffixes such as ('attn.to_q', 'ff.fc1') (the model "
                        f"family's lora_targets), got {targets!r}.")
    prefixes = None if within is None else ((within,) if isinstance(within, str) else tuple(within))
    if prefixes is not None and not all(isinstance(p, str) and p for p in prefixes):
        raise LoRAError(f"within must be None or non-empty module-name prefixes (the model family's lora_within), "
                        f"got {prefixes!r}.")
    inc, exc = _compile_patterns(include, "include"), _compile_patterns(exclude, "exclude")
    where = f" under {list(prefixes)}" if prefixes is not None else ""
    layers = _layer_modules(model)
    scope = [n for n, m in layers if _linear_features(m) is not None and (prefixes is None or n.startswith(prefixes))]
    unmatched = [f"{kind} {p!r}" for kind, patterns in (("include", inc), ("exclude", exc))
                 for p, rx in patterns if not any(rx.match(n) for n in scope)]
    if unmatched:
        raise LoRAError(f"LoRA pattern{'s' if len(unmatched) > 1 else ''} {', '.join(unmatched)} match"
                        f"{'' if len(unmatched) > 1 else 'es'} no Linear layer{where}. Patterns are regular "
                        "expressions matched at the start of the module path (re.match): use '.*to_q' for a suffix, "
                        rf"'transformer_blocks\.(0|1)\.' for blocks. Some layer paths: {_first(scope, 6)}.")
    if inc:
        chosen = [n for n in scope if any(rx.match(n) for _, rx in inc)]
    else:
        chosen = []
        for name, module in layers:
            if not any(name == t or name.endswith("." + t) for t in targets):
                continue
            if prefixes is not None and not name.startswith(prefixes):
                continue
            if _linear_features(module) is None:
                raise LoRAError(f"{name} matches a LoRA target but is a {type(module).__name__}, not a Linear layer; "
                                "remove that suffix from targets.")
            chosen.append(name)
        if not chosen:
            linears = [n for n, m in layers if _linear_features(m) is not None]
            raise LoRAError(f"No Linear layer of the model matches the LoRA targets {list(targets)}{where}. The "
                            f"model's Linear layers are: {_first(linears, 8)}. Pass targets/within that name them.")
    kept = [n for n in chosen if not any(rx.match(n) for _, rx in exc)]
    if not kept:
        raise LoRAError(f"The exclude patterns {[p for p, _ in exc]} remove all {len(chosen)} selected LoRA layers "
                        f"(e.g. {_first(chosen, 3)}). Exclude patterns apply after the selection: to train only some "
                        "layers, list them as include patterns alone.")
    return kept


def inject_lora(model: nn.Module, *, rank: int, alpha: float, targets: Iterable[str],
                within: Iterable[str] | None, dtype: torch.dtype = torch.float32, dropout: float = 0.0,
                generator: torch.Generator | None = None, include: Iterable[str] = (), exclude: Iterable[str] = (),
                rank_dropout: float = 0.0, module_dropout: float = 0.0) -> dict[str, LoRALinear]:
    """Wrap every selected Linear of ``model`` in a fresh trainable :class:`LoRALinear` (in place).

    The layers are those of :func:`lora_candidates` (the family's ``targets`` under ``within``, or the ``include``
    patterns, minus the ``exclude`` patterns). Everything else in the model, including the base weights, is frozen
    (``requires_grad=False``); only ``lora_down``/``lora_up`` train.

    Args:
        model: the DiT (any ``nn.Module``).
        rank, alpha: adapter rank and alpha (scale = alpha / rank).
        targets: module-name suffixes, e.g. ``("attn.to_q", "ff.fc1")`` (the family's ``lora_targets``).
        within: module-name prefixes the layers must live under (the block stacks); None = anywhere.
        dtype: dtype of the adapter parameters.
        dropout, rank_dropout, module_dropout: the adapters' training-mode dropouts (:class:`LoRALinear`).
        generator: optional CPU generator for reproducible ``lora_down`` init (drawn in module order).
        include, exclude: regular expressions over module paths (:func:`lora_candidates`).

    Returns:
        ``{module_path: LoRALinear}`` in module order, e.g. ``"blocks.0.attn.to_q"``.

    Raises:
        LoRAError: the model already holds LoRA layers (call :func:`remove_lora` first); bad rank, alpha or dropout;
            every error of :func:`lora_candidates`. Nothing is changed when it raises.
    """
    existing = _outer_lora_modules(model)
    if existing:
        raise LoRAError(f"The model already has {len(existing)} LoRA layers (e.g. {existing[0][0]}); call "
                        "remove_lora(model) (or merge them) before injecting new ones.")
    _check_settings(rank, alpha, dropout, rank_dropout, module_dropout, dtype)
    chosen = lora_candidates(model, targets=targets, within=within, include=include, exclude=exclude)
    model.requires_grad_(False)
    modules: dict[str, LoRALinear] = {}
    for name in chosen:
        wrapped = LoRALinear(model.get_submodule(name), rank, alpha, dropout=dropout, rank_dropout=rank_dropout,
                             module_dropout=module_dropout, dtype=dtype, generator=generator)
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
# Starting from a LoRA file


def init_lora_from_file(modules: Mapping[str, LoRALinear], path: str | Path, *,
                        family_grammar: "LoRAKeyGrammar | None" = None) -> None:
    """Start training from a LoRA file: copy its weights into the fresh adapters of :func:`inject_lora` (in place).

    Each layer then adds exactly the file's update: ``lora_down = A`` and ``lora_up = B · (α_f / r) / (α_m / r)``
    (computed in float32, stored in the parameters' dtype), so ``(α_m / r) · lora_up · lora_down = (α_f / r) · B · A``
    for the file's alpha ``α_f`` and the module's ``α_m`` at the common rank r. The file may be in any layout
    :func:`cinetune.core.lora_formats.load_lora` reads: Cinetune/ComfyUI (``diffusion_model.`` + ``lora_down``/
    ``lora_up`` + ``.alpha``), kohya/musubi-tuner (``lora_unet_``), PEFT (with its config beside it or in the
    metadata), diffusers names, and the LTX-2 layout (``lora_A``/``lora_B`` with α/r baked into B and no ``.alpha``,
    read at alpha = rank, i.e. the baked scale). Nothing is checked or copied against the base weights.

    Args:
        modules: ``{module path: LoRALinear}`` as :func:`inject_lora` returns it.
        path: the LoRA file.
        family_grammar: the model family's :class:`~cinetune.core.family.LoRAKeyGrammar` (kohya names and
            diffusers names are read with it); None = the registered families'.

    Raises:
        LoRAError: no modules; the file is not a readable LoRA (the message of :func:`load_lora`); its layers
            differ from the modules' (names the layers missing from the file and the file's layers not trained
            here, and the model the file seems to be for); it mixes ranks or its rank differs from the modules'
            (names the rank to set); a layer's shape differs (the file is for another model size). Nothing is
            changed when it raises.
        CheckpointError: the file is missing or unreadable.
    """
    from .lora_formats import _read_lora

    if not modules:
        raise LoRAError("There are no LoRA layers to start from a file: inject the LoRA first (inject_lora).")
    bad = [p for p, m in modules.items() if not isinstance(m, LoRALinear)]
    if bad:
        raise LoRAError(f"init_lora_from_file takes the dict of inject_lora; {_first(bad, 3)} are not LoRALinear.")
    where = str(path)
    weights, unresolved = _read_lora(path, module_names=list(modules), metadata=None, default_alpha=None,
                                     grammar=family_grammar, strict=False)
    missing = [p for p in modules if p not in weights.layers]
    extra = [p for p in weights.layers if p not in modules] + unresolved
    if missing or extra:
        looks, model = guess_model_family([*weights.layers, *unresolved]), guess_model_family(modules)
        if len(extra) == len(weights.layers) + len(unresolved):
            raise LoRAError(f"{where}: none of its {len(extra)} layers is trained in this run (e.g. "
                            f"{_first(extra, 3)}): it seems to be a LoRA for {looks}, the model is {model}. Start "
                            "from a LoRA made for this model.")
        parts = [f"{len(missing)} layers trained here are not in the file: {_first(missing, 4)}"] if missing else []
        if extra:
            parts.append(f"{len(extra)} layers of the file are not trained here: {_first(extra, 4)}")
        raise LoRAError(f"{where}: the LoRA to start from has other layers than this run trains — "
                        + "; ".join(parts) + ". Train the file's layers (the LoRA include/exclude patterns, or the "
                        "trainer's options such as audio layers, select them) or start from a LoRA trained on this "
                        "run's layers.")
    ranks = sorted(weights.ranks())
    if len(ranks) > 1:
        raise LoRAError(f"{where}: its layers have different ranks {ranks}; training can start only from a LoRA of "
                        "one rank.")
    file_rank = ranks[0]
    run_ranks = sorted({m.rank for m in modules.values()})
    if run_ranks != [file_rank]:
        raise LoRAError(f"{where} has rank {file_rank}, this run trains rank {_first(map(str, run_ranks), 3)}: set "
                        f"the rank to {file_rank} to start from it (alpha may stay: the file's update is rescaled to "
                        "it).")
    for p, m in modules.items():
        down, up, _ = weights.layers[p]
        if (up.shape[0], down.shape[1]) != (m.out_features, m.in_features):
            raise LoRAError(f"{where}: layer {p} is [out, in] = {[up.shape[0], down.shape[1]]} in the file but "
                            f"{[m.out_features, m.in_features]} in the model: the LoRA was trained for another "
                            "model size. Start from a LoRA made for this model.")
    with torch.no_grad():
        for p, m in modules.items():
            down, up, alpha = weights.layers[p]
            m.lora_down.copy_(down)
            m.lora_up.copy_(up.float() * ((alpha / file_rank) / m.scale))


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
