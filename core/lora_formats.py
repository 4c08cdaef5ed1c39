"""LoRA files: the key layouts other trainers and ComfyUI use, reading them into :class:`~.lora.LoRAWeights`, and
writing them.

Layouts read by :func:`load_lora` (``<p>`` = module path, e.g. ``blocks.0.attn.to_q``; every layout is normalised to
``<p>`` → ``(down, up, alpha)``), with the alpha used when a layer has no ``.alpha``:

- ``comfyui``: ``diffusion_model.<p>.lora_down.weight`` / ``.lora_up.weight`` (what :func:`save_lora` writes, and
  ComfyUI's own trainer) — alpha = rank (scale 1, as ComfyUI).
- ``kohya``: ``lora_unet_<p with . → _>.lora_down.weight`` / ``.lora_up.weight`` (kohya-ss sd-scripts,
  kohya-ss/musubi-tuner) — alpha = rank.
- ``peft``: ``base_model.model.<p>.lora_A.weight`` / ``.lora_B.weight``, or ``transformer.``/no prefix with
  ``.lora_A.default.weight`` — the PEFT config, else PEFT's default 8.
- ``diffusers``: ``transformer.<p>.lora_A.weight`` / ``.lora_B.weight``; ``bare``: ``<p>.lora_A.weight`` (or
  ``lora_down``) — the PEFT config if one is found (then reported as ``peft``), else alpha = rank. ``<p>`` may be
  in the naming of the family's diffusers port (e.g. LTX-2 ``proj_in`` for ``patchify_proj``); see below.

Weight suffixes accepted with any prefix: ``.lora_down.weight``/``.lora_up.weight``, ``.lora_A.weight``/
``.lora_B.weight``, ``.lora_A.default.weight``/``.lora_B.default.weight``, ``.lora_A``/``.lora_B`` — the plain LoRA
names ComfyUI accepts (``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load``), plus ``<key>.alpha`` (0-dim).
ComfyUI maps ``diffusion_model.<p>`` and ``lora_unet_<p with _>`` for every model (``comfy/lora.py``
``model_lora_keys_unet``), bare ``<p>`` and ``transformer.<p>`` only for some models; it does not map
``base_model.model.``. :func:`save_lora` therefore writes ``diffusion_model.`` keys with ``.alpha``.

Decisions (where the sources leave a choice):

- **Alpha of PEFT files.** PEFT state dicts carry no alpha; it is in the ``LoraConfig`` kwargs saved beside them
  (``config_lora.json`` of the official Kandinsky 5 LoRAs, kandinskylab/kandinsky-5 ``t2v_pipeline.py``;
  ``adapter_config.json`` of PEFT). Alpha comes, in this order, from the ``.alpha`` tensors; a PEFT config
  (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) given as ``metadata``, stored in the safetensors metadata
  (``lora_adapter_metadata``, the key diffusers writes, or ``lora_alpha``), or in ``config_lora.json`` /
  ``adapter_config.json`` next to a file with ``lora_A``/``lora_B`` keys; ``default_alpha``; then PEFT's
  ``LoraConfig`` default ``lora_alpha = 8`` for files that are unmistakably PEFT (``base_model.model.`` prefix or
  ``.default`` adapter keys) — a training config that leaves ``lora_alpha`` unset trains with that. Every other
  file without alpha gets alpha = rank (scale 1), matching ComfyUI and diffusers. Note ComfyUI itself would load a
  PEFT file without ``.alpha`` at scale 1.
- **use_rslora** (scale α/√r, Kalajdzievski 2023, arXiv:2312.03732) is stored as the equivalent alpha α·√r so
  that scale = alpha/rank holds everywhere. ``alpha_pattern`` keys are matched against the end of the module path as
  PEFT does (``re.match(rf"(.*\\.)?({pattern})$", path)``, first match wins). DoRA is rejected.
- **alpha = 0** in a file means alpha = rank, as kohya-ss sd-scripts and musubi-tuner treat it (ComfyUI would apply
  such a layer with scale 0, i.e. not at all).
- **kohya names** replace every ``.`` of the module path with ``_``, which is ambiguous for names that contain
  ``_``. They are resolved against ``module_names`` when given, else with the kohya resolver of ``family_grammar``
  or, without it, of the registered model families (:class:`cinetune.core.family.LoRAKeyGrammar`); a family
  without one needs ``module_names``.
- **diffusers module names.** Where a family's diffusers port renames modules, the paths of ``diffusers``,
  ``peft`` and ``bare`` files are converted to the family's own names with the family's
  :attr:`cinetune.core.family.LoRAKeyGrammar.diffusers_to_official` (of ``family_grammar`` when given, else of the
  family recognised from the LoRA's paths, else from ``module_names``); ``comfyui`` and ``kohya`` files already use
  the family's own names (ComfyUI maps ``diffusion_model.`` keys onto the original model). The PEFT config
  diffusers saves beside such a LoRA (``lora_adapter_metadata``, each field prefixed with ``transformer.`` by
  diffusers ``loaders/lora_base.py`` ``_save_lora_weights``) is read with that prefix removed, and its
  ``alpha_pattern``/``rank_pattern`` are matched against the paths as the file names them.
- **Architecture** of a saved LoRA (``modelspec.architecture``) is the name of the registered family its module
  paths belong to (:func:`cinetune.core.family.guess_family`) unless given.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from .checkpoint import load_state_dict, read_safetensors_header, save_file_atomic
from .family import guess_family, guess_model_family, registered_families
from .lora import LoRAError, LoRALinear, LoRAWeights, _first

if TYPE_CHECKING:
    from .family import LoRAKeyGrammar

__all__ = ["PEFT_DEFAULT_ALPHA", "LAYOUTS", "lora_state_dict", "export_lora_state_dict", "peft_config", "save_lora",
           "load_lora"]

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



# ---------------------------------------------------------------------------------------------------------------
# Writing


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
            (kohya-ss/musubi-tuner naming).
        ``"peft"``: ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``, no alpha tensors — the alphas
            go into the PEFT config, see :func:`peft_config` (the layout of PEFT-trained LoRAs).

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
    family = guess_family(paths)
    return None if family is None else family.name


def save_lora(path: str | os.PathLike, modules: LoRAWeights | Mapping[str, LoRALinear], *,
              metadata: Mapping[str, str], dtype: torch.dtype = torch.bfloat16, layout: str = "comfyui",
              architecture: str | None = None) -> Path:
    """Save a LoRA as safetensors, atomically, in a layout native ComfyUI loads.

    Tensors: see :func:`export_lora_state_dict` (``layout`` ``"comfyui"``, default, or ``"kohya"``); down/up in
    ``dtype``, ``.alpha`` 0-dim float32. Metadata (comfyui.md §10, kohya ``ss_*`` keys): the given ``metadata`` plus
    ``ss_network_dim`` (rank, or ``"Dynamic"`` when layers differ, as kohya), ``ss_network_alpha`` (alpha or
    ``"Dynamic"``) — both always computed from the tensors — and, unless given, ``modelspec.architecture``
    (``architecture``, else the name of the registered model family recognised from the module paths,
    :func:`cinetune.core.family.guess_family`) and
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
            known = ", ".join(f.name for f in registered_families()) or "none registered"
            raise LoRAError(f"Cannot tell which model this LoRA is for: its layers look like "
                            f"{guess_model_family(weights.layers)}; pass architecture= (the model family's name: "
                            f"{known}).")
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


def _resolve_kohya(rest: str, table: dict[str, list[str]] | None, grammar: LoRAKeyGrammar | None,
                   fallback: bool) -> str | None:
    """Module path of a kohya name body: from the model's names (``table``) when given — then, only with
    ``fallback``, also from the grammars —, else from ``grammar`` or every registered family's grammar."""
    if table is not None:
        names = table.get(rest)
        if names and len(names) > 1:
            raise LoRAError(f"kohya LoRA name lora_unet_{rest} fits several modules of the model ({names}); "
                            "this file cannot be mapped unambiguously — convert it to the diffusion_model. layout.")
        if names or not fallback:
            return names[0] if names else None
    grammars = [grammar] if grammar is not None else [f.lora_grammar for f in registered_families()]
    for g in grammars:
        path = g.resolve_kohya(rest)
        if path is not None:
            return path
    return None


def _official_names(fmt: str, paths: list[str], module_names: list[str] | None,
                    grammar: LoRAKeyGrammar | None) -> Callable[[str], str] | None:
    """The converter of diffusers module names of the family the LoRA (else the model) belongs to, for the layouts
    diffusers and PEFT write; None where names need no conversion."""
    if fmt not in ("diffusers", "peft", "bare"):
        return None
    if grammar is not None:
        return grammar.official_path
    family = guess_family(paths)
    if family is None and module_names is not None:
        family = guess_family(module_names)
    return None if family is None else family.lora_grammar.official_path


def _peft_config_from_metadata(md: Mapping[str, Any]) -> dict[str, Any] | None:
    for key in ("lora_adapter_metadata", "config_lora", "peft_config"):
        if key in md:
            raw = md[key]
            try:
                cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
            except (TypeError, ValueError) as e:
                raise LoRAError(f"metadata entry {key!r} is not a JSON PEFT config ({e}).") from e
            if "lora_alpha" not in cfg and "r" not in cfg:
                cfg = {k[len(_DIFFUSERS_PREFIX):]: v for k, v in cfg.items() if k.startswith(_DIFFUSERS_PREFIX)}
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
              default_alpha: float | None = None, family_grammar: LoRAKeyGrammar | None = None) -> LoRAWeights:
    """Read a LoRA in any supported layout (listed in the module docstring) and normalise it.

    Args:
        path_or_state_dict: a ``.safetensors`` (or PyTorch pickle) file, or a state dict.
        module_names: module paths of the target model (e.g. ``[n for n, _ in model.named_modules()]``). When given,
            every LoRA layer must name one of them, and kohya names are resolved against them. When None, kohya
            names are resolved with the kohya resolvers of the registered model families. They also tell the
            family whose diffusers names to convert when the LoRA's own paths do not (module docstring).
        metadata: extra metadata (overrides the file's); may carry a PEFT config (``lora_alpha``, ``r``,
            ``alpha_pattern``, ``use_rslora`` keys, or a JSON config under ``lora_adapter_metadata``).
        default_alpha: alpha for layers without any alpha information in the file or a PEFT config.
        family_grammar: the :class:`~cinetune.core.family.LoRAKeyGrammar` of the model's family, when known: kohya
            names are then resolved with it (not with every registered family's) and diffusers names converted with
            its ``diffusers_to_official``.

    Returns:
        :class:`LoRAWeights` keyed by the family's own module paths, with tensors in their stored dtypes on the
        CPU (or the state dict's device).

    Raises:
        LoRAError: not a LoRA (names some keys); mixed or unknown key layouts (names the keys); a layer with only
            one half or mismatched ranks; the same layer under its own and its diffusers name; conv (non 2-D) LoRAs; kohya names that cannot be resolved; layers absent
            from ``module_names`` (lists them and names the model the LoRA seems to be for); a PEFT config that
            contradicts the tensors.
        CheckpointError: the file is missing or not a readable safetensors/pickle file.
    """
    return _read_lora(path_or_state_dict, module_names=module_names, metadata=metadata, default_alpha=default_alpha,
                      grammar=family_grammar, strict=True)[0]


def _read_lora(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *,
               module_names: Iterable[str] | None, metadata: Mapping[str, Any] | None, default_alpha: float | None,
               grammar: LoRAKeyGrammar | None, strict: bool) -> tuple[LoRAWeights, list[str]]:
    """:func:`load_lora`, and the kohya keys no grammar resolves. With ``strict`` False, layers that are not in
    ``module_names`` and unresolved kohya names are not errors: the layers are kept (kohya names resolved with the
    grammars where the model's names do not have them) and the unresolved keys returned, for callers that report
    layer-set differences themselves."""
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
    to_official = _official_names(fmt, [rest for rest, _ in parsed], names, grammar)
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    file_paths: dict[str, str] = {}  # layer → its path as the file names it (PEFT config patterns match that)
    unresolved: list[str] = []
    for (rest, role), (key, tensor) in parsed.items():
        path = _resolve_kohya(rest, table, grammar, not strict) if fmt == "kohya" else rest
        if path is None:
            unresolved.append(_KOHYA_PREFIX + rest)
            continue
        layer = path if to_official is None else to_official(path)
        if role in halves.get(layer, {}):
            raise LoRAError(f"{where}: {halves[layer][role][0]} and {key} are the same LoRA weight of {layer}, once "
                            "in the model's own module names and once in its diffusers names; keep one of them.")
        halves.setdefault(layer, {})[role] = (key, tensor)
        file_paths[layer] = path
    unresolved = sorted(set(unresolved))
    if unresolved and names is None and strict:
        known = ", ".join(f.display_name for f in registered_families()) or "none registered"
        raise LoRAError(f"{where}: kohya names that no registered model family ({known}) resolves: "
                        f"{_first(unresolved)}. They look like LoRA layers for {guess_model_family(unresolved)}; "
                        "pass module_names (the target model's module names) to resolve them.")
    if name_set is not None and strict:
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
            alpha, source = _alpha_from_peft(cfg, file_paths[layer], rank, cfg_where), "config"
        elif default_alpha is not None:
            alpha, source = default_alpha, "default_alpha"
        elif fmt == "peft":
            alpha, source = PEFT_DEFAULT_ALPHA, "peft-default"
        else:
            alpha, source = float(rank), "rank"
        sources.add(source)
        layers[layer] = (down, up, alpha)
    return LoRAWeights(layers, fmt, {k: str(v) for k, v in meta.items()}, ",".join(sorted(sources))), unresolved


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

