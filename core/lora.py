"""LoRA: trainable low-rank adapters on Linear layers, injection, merging, and the LoRA file formats.

Math (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, eq. 3 and the α/r
scaling of §4.1)::

    y = base(x) + m · (α / r) · (x Aᵀ) Bᵀ        A = lora_down [r, in],  B = lora_up [out, r]
    merged:  W' = W + s · (α / r) · B A           (m: runtime multiplier, s: merge strength)

Initialisation as kohya-ss/sd-scripts ``networks/lora.py`` (``LoRAModule``) and PEFT ``tuners/lora/layer.py``:
A kaiming-uniform with a = √5 (``nn.Linear``'s default), B zeros, so a fresh adapter changes nothing.

Layouts read by :func:`load_lora` (``<p>`` = module path, e.g. ``visual_transformer_blocks.0.self_attention.to_query``;
every layout is normalised to ``<p>`` → ``(down, up, alpha)``), with the alpha used when a layer has no ``.alpha``:

- ``comfyui``: ``diffusion_model.<p>.lora_down.weight`` / ``.lora_up.weight`` (what :func:`save_lora` writes, and
  ComfyUI's own trainer) — alpha = rank (scale 1, as ComfyUI).
- ``kohya``: ``lora_unet_<p with . → _>.lora_down.weight`` / ``.lora_up.weight`` (kohya-ss sd-scripts,
  kohya-ss/musubi-tuner) — alpha = rank.
- ``peft``: ``base_model.model.<p>.lora_A.weight`` / ``.lora_B.weight`` (official Kandinsky 5 LoRAs), or
  ``transformer.``/no prefix with ``.lora_A.default.weight`` — the PEFT config, else PEFT's default 8.
- ``diffusers``: ``transformer.<p>.lora_A.weight`` / ``.lora_B.weight``; ``bare``: ``<p>.lora_A.weight`` (or
  ``lora_down``) — the PEFT config if one is found (then reported as ``peft``), else alpha = rank.

Weight suffixes accepted with any prefix: ``.lora_down.weight``/``.lora_up.weight``, ``.lora_A.weight``/
``.lora_B.weight``, ``.lora_A.default.weight``/``.lora_B.default.weight``, ``.lora_A``/``.lora_B`` — the plain LoRA
names ComfyUI accepts (``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load``), plus ``<key>.alpha`` (0-dim).
ComfyUI maps ``diffusion_model.<p>`` and ``lora_unet_<p with _>`` for every model (``comfy/lora.py``
``model_lora_keys_unet``), and bare ``<p>`` and ``transformer.<p>`` for Kandinsky 5 since ComfyUI 0.4.0; it does
not map ``base_model.model.``. :func:`save_lora` therefore writes ``diffusion_model.`` keys with ``.alpha``.

Decisions (where the sources leave a choice):

- **Alpha of PEFT files.** The official Kandinsky 5 LoRAs are PEFT state dicts with ``config_lora.json``
  (LoraConfig kwargs) beside them (kandinskylab/kandinsky-5 ``t2v_pipeline.py``). Alpha comes, in this order, from
  the ``.alpha`` tensors; a PEFT config (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) given as ``metadata``,
  stored in the safetensors metadata (``lora_adapter_metadata``, the key diffusers writes, or ``lora_alpha``), or in
  ``config_lora.json`` / ``adapter_config.json`` next to a file with ``lora_A``/``lora_B`` keys; ``default_alpha``;
  then PEFT's ``LoraConfig`` default ``lora_alpha = 8`` for files that are unmistakably PEFT (``base_model.model.``
  prefix or ``.default`` adapter keys) — the official training yaml leaves ``lora_alpha`` unset, so that is what
  such a LoRA was trained with. Every other file without alpha gets alpha = rank (scale 1), matching ComfyUI and
  diffusers. Note ComfyUI itself would load a PEFT file without ``.alpha`` at scale 1.
- **use_rslora** (scale α/√r, Kalajdzievski 2023, arXiv:2312.03732) is stored as the equivalent alpha α·√r so that
  scale = alpha/rank holds everywhere. ``alpha_pattern`` keys are matched against the end of the module path as
  PEFT does (``re.match(rf"(.*\\.)?({pattern})$", path)``, first match wins). DoRA is rejected.
- **alpha = 0** in a file means alpha = rank, as kohya-ss sd-scripts and musubi-tuner treat it (ComfyUI would apply
  such a layer with scale 0, i.e. not at all).
- **kohya names** replace every ``.`` of the module path with ``_``, which is ambiguous for names that contain
  ``_`` (``visual_transformer_blocks``). They are resolved against ``module_names`` when given, else against the
  Kandinsky 5 block grammar (``{text,visual}_transformer_blocks_<i>_<self_attention|cross_attention|feed_forward>
  _<layer>``); other models must pass ``module_names``.
- **fp8 merge** dequantises, adds the delta in float32 and requantises with a fresh per-tensor scale
  (:func:`cinetune.core.quant.quantize_fp8`); :func:`apply_lora_unmerged` avoids that rounding.
"""

from __future__ import annotations

from contextlib import contextmanager
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_state_dict, read_safetensors_header, save_file_atomic
from .quant import FP8Linear

#: The Linear layers the official Kandinsky 5 LoRA training targets (PEFT suffix match, so text and visual blocks;
#: kandinskylab/kandinsky-5-lora-train ``lora_train.py``, whose attribution is unconfirmed); musubi-tuner
#: ``networks/lora_kandinsky.py`` selects exactly the same layers (k5.md §8).
K5_LORA_TARGETS: tuple[str, ...] = (
    "self_attention.to_query", "self_attention.to_key", "self_attention.to_value", "self_attention.out_layer",
    "cross_attention.to_query", "cross_attention.to_key", "cross_attention.to_value", "cross_attention.out_layer",
    "feed_forward.in_layer", "feed_forward.out_layer",
)
#: Where the Kandinsky 5 targets live: the text and visual transformer blocks.
K5_BLOCK_PREFIXES: tuple[str, ...] = ("text_transformer_blocks.", "visual_transformer_blocks.")
#: PEFT ``LoraConfig.lora_alpha`` default, used for PEFT files that carry no alpha anywhere.
PEFT_DEFAULT_ALPHA = 8.0
#: Layouts :func:`export_lora_state_dict` can write.
LAYOUTS = ("comfyui", "kohya", "peft")

_COMFY_PREFIX = "diffusion_model."
_KOHYA_PREFIX = "lora_unet_"
_PEFT_PREFIX = "base_model.model."
_DIFFUSERS_PREFIX = "transformer."
_PEFT_CONFIG_FILES = ("config_lora.json", "adapter_config.json")

# (suffix, role, family, peft-adapter-name) in matching order.
_SUFFIXES = (
    (".lora_down.weight", "down", "down/up", False),
    (".lora_up.weight", "up", "down/up", False),
    (".lora_A.default.weight", "down", "A/B", True),
    (".lora_B.default.weight", "up", "A/B", True),
    (".lora_A.weight", "down", "A/B", False),
    (".lora_B.weight", "up", "A/B", False),
    (".lora_A", "down", "A/B", False),
    (".lora_B", "up", "A/B", False),
    (".alpha", "alpha", None, False),
)

_K5_KOHYA = re.compile(
    r"(text_transformer_blocks|visual_transformer_blocks)_(\d+)_(self_attention|cross_attention|feed_forward)_"
    r"(to_query|to_key|to_value|out_layer|in_layer)")

# Name patterns of model families, to say which model a foreign LoRA was made for. "." or "_" separators, so kohya
# names are recognised too.
_FAMILIES = (
    (re.compile(r"(text|visual)_transformer_blocks[._]\d+"), "Kandinsky 5"),
    (re.compile(r"transformer_blocks[._]\d+[._](attn1|attn2|audio_attn\d|ff|audio_ff|audio_to_video_attn)"),
     "LTX-Video / LTX-2"),
    (re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)"), "Wan 2.x"),
    (re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)[._]\d+"), "Flux / HunyuanVideo"),
    (re.compile(r"(input_blocks|output_blocks|down_blocks|up_blocks|mid_block)"), "a Stable Diffusion UNet"),
    (re.compile(r"(lora_te\d?_|text_model|text_encoder)"), "a text encoder"),
)


class LoRAError(CheckpointError):
    """A LoRA cannot be read, injected or applied. The message says what is wrong and how to fix it."""


def _first(items: Iterable[str], n: int = 10) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f" … ({len(items)} in all)" if len(items) > n else f" ({len(items)} in all)")


def guess_model_family(names: Iterable[str]) -> str:
    """Name the model family a set of LoRA/module names belongs to, for error messages.

    Args:
        names: module paths or LoRA keys (dotted, or kohya ``lora_unet_`` names with ``_``).

    Returns:
        e.g. ``"Kandinsky 5 (highest text block 3, visual block 59; Video Lite has 2 text / 32 visual blocks,
        Video Pro 4 / 60)"``, ``"LTX-Video / LTX-2"``, or ``"an unknown model"``.
    """
    names = list(names)
    votes: Counter[str] = Counter()
    for name in names:
        for pattern, family in _FAMILIES:
            if pattern.search(name):
                votes[family] += 1
                break
    if not votes:
        return "an unknown model"
    family = votes.most_common(1)[0][0]
    if family == "Kandinsky 5":
        highest = {"text": -1, "visual": -1}
        for name in names:
            for kind, idx in re.findall(r"(text|visual)_transformer_blocks[._](\d+)", name):
                highest[kind] = max(highest[kind], int(idx))
        family += (f" (highest text block {highest['text']}, visual block {highest['visual']}; Video Lite has "
                   "2 text / 32 visual blocks, Video Pro 4 / 60)")
    return family


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


def inject_lora(model: nn.Module, *, rank: int, alpha: float, targets: Iterable[str] = K5_LORA_TARGETS,
                within: Iterable[str] | None = K5_BLOCK_PREFIXES, dtype: torch.dtype = torch.float32,
                dropout: float = 0.0, generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Wrap every targeted Linear of ``model`` in a fresh trainable :class:`LoRALinear` (in place).

    A module is targeted when its qualified name equals a target or ends with ``"." + target`` (PEFT-style suffix
    match) and, unless ``within`` is None, starts with one of the ``within`` prefixes. For Kandinsky 5 the defaults
    give 6 layers per text block and 10 per visual block (Lite 332, Pro 624 — k5.md §8). Everything else in the
    model, including the base weights, is frozen (``requires_grad=False``); only ``lora_down``/``lora_up`` train.

    Args:
        model: the DiT (any ``nn.Module``).
        rank, alpha: adapter rank and alpha (scale = alpha / rank).
        targets: name suffixes (default :data:`K5_LORA_TARGETS`).
        within: name prefixes the targets must live under (default :data:`K5_BLOCK_PREFIXES`; None = anywhere).
        dtype: dtype of the adapter parameters. dropout: adapter input dropout.
        generator: optional CPU generator for reproducible ``lora_down`` init (drawn in module order).

    Returns:
        ``{module_path: LoRALinear}`` in module order, e.g.
        ``"visual_transformer_blocks.0.self_attention.to_query"``.

    Raises:
        LoRAError: the model already holds LoRA layers (call :func:`remove_lora` first); nothing matched (the
            message lists some Linear names of the model); a matched module is not a Linear; bad rank/alpha.
    """
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise LoRAError(f"targets must be non-empty module-name suffixes such as {K5_LORA_TARGETS[:2]}, "
                        f"got {targets!r}.")
    prefixes = None if within is None else tuple(within)
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
# Weights in memory and on disk


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


def _as_weights(obj: LoRAWeights | Mapping[str, LoRALinear]) -> LoRAWeights:
    if isinstance(obj, LoRAWeights):
        return obj
    if isinstance(obj, Mapping):
        return LoRAWeights.from_modules(obj)
    raise LoRAError(f"Expected LoRAWeights or the dict returned by inject_lora, got {type(obj).__name__}.")


def lora_state_dict(modules: Mapping[str, LoRALinear], *, prefix: str = _COMFY_PREFIX) -> dict[str, torch.Tensor]:
    """State dict of trained adapters in the layout native ComfyUI loads (comfyui.md §10).

    Keys ``f"{prefix}{path}.lora_down.weight"`` ``[rank, in]``, ``".lora_up.weight"`` ``[out, rank]`` (detached, in
    the parameters' dtype) and ``".alpha"`` (0-dim float32). With the default prefix ``diffusion_model.`` ComfyUI's
    ``LoraLoaderModelOnly`` maps them for every model (``comfy/lora.py`` ``model_lora_keys_unet``).

    Raises:
        LoRAError: a value is not a LoRALinear.
    """
    out: dict[str, torch.Tensor] = {}
    for path, m in modules.items():
        if not isinstance(m, LoRALinear):
            raise LoRAError(f"{path} is a {type(m).__name__}, not a LoRALinear.")
        out[f"{prefix}{path}.lora_down.weight"] = m.lora_down.detach()
        out[f"{prefix}{path}.lora_up.weight"] = m.lora_up.detach()
        out[f"{prefix}{path}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def export_lora_state_dict(weights: LoRAWeights | Mapping[str, LoRALinear], *, layout: str = "comfyui",
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Write a LoRA in one of the layouts :func:`load_lora` reads.

    Layouts:
        ``"comfyui"``: ``diffusion_model.<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
        ``"kohya"``: ``lora_unet_<path with . → _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
            (kohya-ss/musubi-tuner naming, k5.md §8).
        ``"peft"``: ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``, no alpha tensors — the alphas
            go into the PEFT config, see :func:`peft_config` (official Kandinsky 5 LoRA layout).

    Args:
        weights: LoRAWeights or the dict of :func:`inject_lora`.
        layout: one of :data:`LAYOUTS`.
        dtype: dtype for down/up (None keeps theirs); alpha is always 0-dim float32.

    Returns:
        New dict of CPU tensors.

    Raises:
        LoRAError: unknown layout.
    """
    if layout not in LAYOUTS:
        raise LoRAError(f"Unknown LoRA layout {layout!r}; choose one of {LAYOUTS}.")
    weights = _as_weights(weights)
    out: dict[str, torch.Tensor] = {}
    for path, (down, up, alpha) in weights.layers.items():
        down = down.detach().to("cpu", dtype or down.dtype)
        up = up.detach().to("cpu", dtype or up.dtype)
        if layout == "peft":
            out[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = down
            out[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = up
            continue
        key = _COMFY_PREFIX + path if layout == "comfyui" else _KOHYA_PREFIX + path.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def peft_config(weights: LoRAWeights | Mapping[str, LoRALinear]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` kwargs (``config_lora.json`` of the official LoRAs) for a LoRA exported as ``"peft"``.

    ``r`` and ``lora_alpha`` are the most common rank and alpha; layers that differ get ``rank_pattern`` /
    ``alpha_pattern`` entries keyed by their full module path. ``target_modules`` lists the full paths, so PEFT adds
    adapters to exactly these layers.

    Returns:
        ``{"r": int, "lora_alpha": float, "target_modules": [...], "rank_pattern": {...}, "alpha_pattern": {...}}``.
    """
    weights = _as_weights(weights)
    if not weights.layers:
        raise LoRAError("This LoRA has no layers.")
    ranks = {p: d.shape[0] for p, (d, _, _) in weights.layers.items()}
    alphas = {p: a for p, (_, _, a) in weights.layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r, "lora_alpha": a, "target_modules": list(weights.layers),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != a},
    }


def _architecture(paths: Iterable[str]) -> str | None:
    family = guess_model_family(paths)
    if family.startswith("Kandinsky 5"):
        return "kandinsky-5"
    if family.startswith("LTX"):
        return "ltx-2"
    return None


def save_lora(path: str | os.PathLike, modules: LoRAWeights | Mapping[str, LoRALinear], *,
              metadata: Mapping[str, str], dtype: torch.dtype = torch.bfloat16, layout: str = "comfyui",
              architecture: str | None = None) -> Path:
    """Save a LoRA as safetensors, atomically, in a layout native ComfyUI loads.

    Tensors: see :func:`export_lora_state_dict` (``layout`` ``"comfyui"``, default, or ``"kohya"``); down/up in
    ``dtype``, ``.alpha`` 0-dim float32. Metadata (comfyui.md §10, kohya ``ss_*`` keys): the given ``metadata`` plus
    ``ss_network_dim`` (rank, or ``"Dynamic"`` when layers differ, as kohya), ``ss_network_alpha`` (alpha or
    ``"Dynamic"``) — both always computed from the tensors — and, unless given, ``modelspec.architecture``
    (``architecture``, else ``"kandinsky-5"`` / ``"ltx-2"`` recognised from the module names) and
    ``trainer`` = ``"cinetune"``.

    Args:
        path: destination ``.safetensors`` (folders are created).
        modules: the dict of :func:`inject_lora` or a :class:`LoRAWeights`.
        metadata: str → str (e.g. trigger word, training settings).
        dtype: storage dtype of down/up. layout: ``"comfyui"`` or ``"kohya"``.
        architecture: ``modelspec.architecture`` value when not in ``metadata``.

    Returns:
        The written path.

    Raises:
        LoRAError: empty LoRA, non-string metadata, unknown layout, architecture unknown and not given.
    """
    if layout not in ("comfyui", "kohya"):
        raise LoRAError(f"save_lora writes layout 'comfyui' or 'kohya' (both load in ComfyUI), got {layout!r}; "
                        "use export_lora_state_dict + peft_config for the PEFT layout.")
    weights = _as_weights(modules)
    if not weights.layers:
        raise LoRAError("Nothing to save: the LoRA has no layers.")
    bad = {k: type(v).__name__ for k, v in dict(metadata).items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise LoRAError(f"safetensors metadata must map str to str; these entries are not strings: {bad}. "
                        "Convert values with str() or json.dumps().")
    meta = dict(metadata)
    ranks = weights.ranks()
    alphas = {a for _, _, a in weights.layers.values()}
    meta["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = f"{next(iter(alphas)):g}" if len(alphas) == 1 else "Dynamic"
    if "modelspec.architecture" not in meta:
        arch = architecture or _architecture(weights.layers)
        if arch is None:
            raise LoRAError("Cannot tell which model this LoRA is for; pass architecture= (e.g. 'kandinsky-5').")
        meta["modelspec.architecture"] = arch
    meta.setdefault("trainer", "cinetune")
    return save_file_atomic(export_lora_state_dict(weights, layout=layout, dtype=dtype), path, meta)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _split_key(key: str) -> tuple[str, str, str | None, bool] | None:
    """``key`` → (head, role, family, has_default) or None when it is not a plain LoRA key."""
    for suffix, role, family, default in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, family, default
    return None


def _prefix_format(head: str) -> tuple[str, str]:
    for prefix, fmt in ((_COMFY_PREFIX, "comfyui"), (_KOHYA_PREFIX, "kohya"), (_PEFT_PREFIX, "peft"),
                        (_DIFFUSERS_PREFIX, "diffusers")):
        if head.startswith(prefix):
            return fmt, head[len(prefix):]
    return "bare", head


def _kohya_table(module_names: Iterable[str]) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for name in module_names:
        table.setdefault(name.replace(".", "_"), []).append(name)
    return table


def _resolve_kohya(rest: str, table: dict[str, list[str]] | None) -> str | None:
    if table is not None:
        names = table.get(rest)
        if names and len(names) > 1:
            raise LoRAError(f"kohya LoRA name lora_unet_{rest} fits several modules of the model ({names}); "
                            "this file cannot be mapped unambiguously — convert it to the diffusion_model. layout.")
        return names[0] if names else None
    m = _K5_KOHYA.fullmatch(rest)
    return f"{m[1]}.{m[2]}.{m[3]}.{m[4]}" if m else None


def _peft_config_from_metadata(md: Mapping[str, Any]) -> dict[str, Any] | None:
    for key in ("lora_adapter_metadata", "config_lora", "peft_config"):
        if key in md:
            raw = md[key]
            try:
                cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
            except (TypeError, ValueError) as e:
                raise LoRAError(f"metadata entry {key!r} is not a JSON PEFT config ({e}).") from e
            if "lora_alpha" in cfg or "r" in cfg:
                return cfg
    if "lora_alpha" in md:
        cfg: dict[str, Any] = {"lora_alpha": md["lora_alpha"]}
        for key in ("r", "use_rslora", "alpha_pattern", "rank_pattern", "use_dora"):
            if key in md:
                value = md[key]
                if isinstance(value, str) and key not in ("r",):
                    try:
                        value = json.loads(value)
                    except ValueError:
                        pass
                cfg[key] = value
        return cfg
    return None


def _read_peft_config_file(folder: Path) -> tuple[dict[str, Any], Path] | None:
    for name in _PEFT_CONFIG_FILES:
        candidate = folder / name
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), candidate
            except (OSError, ValueError) as e:
                raise LoRAError(f"{candidate}: cannot read the PEFT LoRA config ({e}); fix or delete it.") from e
    return None


def _pattern_value(patterns: Mapping[str, Any] | None, path: str) -> Any:
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _alpha_from_peft(cfg: Mapping[str, Any], path: str, rank: int, where: str) -> float:
    """Effective alpha (scale = alpha / rank) of layer ``path`` from a PEFT LoraConfig dict."""
    if _truthy(cfg.get("use_dora")):
        raise LoRAError(f"{where}: DoRA adapters (use_dora) are not supported; use a plain LoRA.")
    expected_r = _pattern_value(cfg.get("rank_pattern"), path)
    if expected_r is None:
        expected_r = cfg.get("r")
    if expected_r is not None and int(expected_r) != rank:
        raise LoRAError(f"{where}: the PEFT config says rank {expected_r} for {path} but the LoRA's tensors have "
                        f"rank {rank}; the config belongs to a different LoRA. Keep each PEFT LoRA in its own folder "
                        "with its own config_lora.json, or pass metadata={'lora_alpha': ...}.")
    alpha = _pattern_value(cfg.get("alpha_pattern"), path)
    if alpha is None:
        alpha = cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    try:
        alpha = float(alpha)
    except (TypeError, ValueError) as e:
        raise LoRAError(f"{where}: lora_alpha {alpha!r} is not a number.") from e
    if _truthy(cfg.get("use_rslora")):
        alpha *= math.sqrt(rank)
    return alpha


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def load_lora(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *,
              module_names: Iterable[str] | None = None, metadata: Mapping[str, Any] | None = None,
              default_alpha: float | None = None) -> LoRAWeights:
    """Read a LoRA in any supported layout (listed in the module docstring) and normalise it.

    Args:
        path_or_state_dict: a ``.safetensors`` (or PyTorch pickle) file, or a state dict.
        module_names: module paths of the target model (e.g. ``[n for n, _ in model.named_modules()]``). When given,
            every LoRA layer must name one of them, and kohya names are resolved against them. When None, kohya
            names are resolved with the Kandinsky 5 block grammar.
        metadata: extra metadata (overrides the file's); may carry a PEFT config (``lora_alpha``, ``r``,
            ``alpha_pattern``, ``use_rslora`` keys, or a JSON config under ``lora_adapter_metadata``).
        default_alpha: alpha for layers without any alpha information in the file or a PEFT config.

    Returns:
        :class:`LoRAWeights` with tensors in their stored dtypes on the CPU (or the state dict's device).

    Raises:
        LoRAError: not a LoRA (names some keys); mixed or unknown key layouts (names the keys); a layer with only
            one half or mismatched ranks; conv (non 2-D) LoRAs; kohya names that cannot be resolved; layers absent
            from ``module_names`` (lists them and names the model the LoRA seems to be for); a PEFT config that
            contradicts the tensors.
        CheckpointError: the file is missing or not a readable safetensors/pickle file.
    """
    file_meta: dict[str, str] = {}
    folder: Path | None = None
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        where = str(path)
        sd = load_state_dict(path)
        if path.suffix.lower() == ".safetensors":
            file_meta = dict(read_safetensors_header(path)[1])
        folder = path.parent
    elif isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
        where = "LoRA state dict"
    else:
        raise LoRAError(f"load_lora takes a file path or a state dict, got {type(path_or_state_dict).__name__}.")
    meta = {**file_meta, **dict(metadata or {})}

    parsed: dict[tuple[str, str], tuple[str, torch.Tensor]] = {}
    formats: dict[str, str] = {}
    families: dict[str, str] = {}
    unknown: list[str] = []
    has_default = False
    for key, tensor in sd.items():
        split = _split_key(key) if isinstance(tensor, torch.Tensor) else None
        if split is None:
            unknown.append(key)
            continue
        head, role, family, default = split
        fmt, rest = _prefix_format(head)
        formats.setdefault(fmt, key)
        if family is not None:
            families.setdefault(family, key)
        has_default |= default
        if (rest, role) in parsed:
            raise LoRAError(f"{where}: two tensors for the same LoRA weight: {parsed[(rest, role)][0]} and {key}.")
        parsed[(rest, role)] = (key, tensor)

    if not any(role != "alpha" for _, role in parsed):
        raise LoRAError(f"{where} is not a LoRA: it has no lora_down/lora_up (or lora_A/lora_B) tensors. Keys seen: "
                        f"{_first(sd, 6)}. Load models with the model loaders and LoRAs with the LoRA loader.")
    if unknown:
        raise LoRAError(f"{where}: tensors that are not plain LoRA weights: {_first(unknown, 6)}. Supported are "
                        "lora_down/lora_up or lora_A/lora_B pairs with optional .alpha; LoHa, LoKr, DoRA and "
                        "full-weight diffs (.diff) are not.")
    if len(formats) > 1:
        raise LoRAError(f"{where}: keys in mixed layouts: " + "; ".join(f"{f} (e.g. {k})" for f, k in formats.items())
                        + ". A LoRA file must use one naming scheme; re-export it from its trainer.")
    if len(families) > 1:
        raise LoRAError(f"{where}: mixes lora_down/lora_up with lora_A/lora_B names (e.g. "
                        + ", ".join(families.values()) + "); re-export it from its trainer.")
    fmt = next(iter(formats))
    family = next(iter(families), "down/up")
    if fmt in ("bare", "diffusers") and has_default:
        fmt = "peft"

    names = None if module_names is None else list(module_names)
    table = _kohya_table(names) if (fmt == "kohya" and names is not None) else None
    name_set = set(names) if names is not None else None

    # Group halves by layer and resolve names.
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unresolved: list[str] = []
    for (rest, role), (key, tensor) in parsed.items():
        layer = _resolve_kohya(rest, table) if fmt == "kohya" else rest
        if layer is None:
            unresolved.append(_KOHYA_PREFIX + rest)
            continue
        halves.setdefault(layer, {})[role] = (key, tensor)
    unresolved = sorted(set(unresolved))
    if unresolved and names is None:
        raise LoRAError(f"{where}: kohya names that are not Kandinsky 5 block layers: {_first(unresolved)}. They "
                        f"look like LoRA layers for {guess_model_family(unresolved)}; pass module_names "
                        "(the target model's module names) to resolve them.")
    if name_set is not None:
        missing = sorted({layer for layer in halves if layer not in name_set} | set(unresolved))
        if missing:
            raise LoRAError(f"{where}: {len(missing)} LoRA layers name no module of this model: {_first(missing)}. "
                            f"The LoRA seems to be for {guess_model_family(missing)}, the model is "
                            f"{guess_model_family(name_set)}. Use a LoRA made for this model.")

    cfg = _peft_config_from_metadata(meta)
    cfg_where = f"{where} metadata"
    if cfg is None and folder is not None and family == "A/B":
        found = _read_peft_config_file(folder)
        if found is not None:
            cfg, cfg_file = found
            cfg_where = str(cfg_file)
    if cfg is not None and fmt in ("bare", "diffusers"):
        fmt = "peft"
    if default_alpha is not None:
        default_alpha = float(default_alpha)
        if not math.isfinite(default_alpha) or default_alpha <= 0:
            raise LoRAError(f"default_alpha must be a finite number > 0, got {default_alpha}.")

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    sources: set[str] = set()
    for layer in sorted(halves, key=_natural_key):
        parts = halves[layer]
        if "down" not in parts or "up" not in parts:
            have, lacking = ("down", "up") if "down" in parts else ("up", "down")
            if have not in parts:
                raise LoRAError(f"{where}: {parts['alpha'][0]} has no lora_down/lora_up tensors beside it.")
            raise LoRAError(f"{where}: layer {layer} has lora_{have} ({parts[have][0]}) but no lora_{lacking}; "
                            "the file is incomplete.")
        (dkey, down), (ukey, up) = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2:
            raise LoRAError(f"{where}: layer {layer} has {down.ndim}-D/{up.ndim}-D LoRA weights "
                            f"({list(down.shape)}, {list(up.shape)}); only Linear (2-D) LoRAs are supported.")
        if not (down.dtype.is_floating_point and up.dtype.is_floating_point):
            raise LoRAError(f"{where}: layer {layer} has non-float LoRA weights ({down.dtype}, {up.dtype}).")
        if down.shape[0] != up.shape[1]:
            raise LoRAError(f"{where}: rank mismatch in layer {layer}: lora_down {dkey} is {list(down.shape)} "
                            f"[rank, in] but lora_up {ukey} is {list(up.shape)} [out, rank]. The file is damaged "
                            "or its halves come from different LoRAs.")
        rank = down.shape[0]
        if "alpha" in parts:
            akey, a = parts["alpha"]
            if a.numel() != 1 or a.dtype.is_complex or a.dtype == torch.bool:
                raise LoRAError(f"{where}: {akey} must be a single number, got {a.dtype} {list(a.shape)}.")
            alpha = float(a.reshape(()).item())
            if not math.isfinite(alpha) or alpha < 0:
                raise LoRAError(f"{where}: {akey} = {alpha} is not a valid alpha.")
            alpha, source = (alpha, "file") if alpha > 0 else (float(rank), "rank")
        elif cfg is not None:
            alpha, source = _alpha_from_peft(cfg, layer, rank, cfg_where), "config"
        elif default_alpha is not None:
            alpha, source = default_alpha, "default_alpha"
        elif fmt == "peft":
            alpha, source = PEFT_DEFAULT_ALPHA, "peft-default"
        else:
            alpha, source = float(rank), "rank"
        sources.add(source)
        layers[layer] = (down, up, alpha)
    return LoRAWeights(layers, fmt, {k: str(v) for k, v in meta.items()}, ",".join(sorted(sources)))


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


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
                "for a model of another size (e.g. a Kandinsky 5 Pro LoRA, width 4096, on Lite, width 1792); use a "
                "LoRA made for this model.")
        found.append((path, module, down, up, alpha))
    if missing:
        raise LoRAError(f"{len(missing)} LoRA layers name no module of this model: {_first(missing)}. The LoRA seems "
                        f"to be for {guess_model_family(missing)}, the model is "
                        f"{guess_model_family(modules)}. Use a LoRA made for this model.")
    return found


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
