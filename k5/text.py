"""Kandinsky 5 text encoders: Qwen2.5-VL-7B-Instruct (language model only) and the CLIP-L text tower.

What the DiT receives (official inference, kandinskylab/kandinsky-5 ``kandinsky/models/text_embedders.py``):

- **Qwen2.5-VL**: the prompt is put into a system/user chat template (``TEMPLATES``, typos "promt" and "scren"
  kept: they change the token count), tokenized without BOS, run through the language model, and the last hidden
  state **after the final RMSNorm** is kept from the start of the user turn onwards: the prompt's tokens plus the
  closing ``<|im_end|>``, at most ``MAX_PROMPT_TOKENS`` (256) tokens. Prompts of a batch are right-padded; the
  padding is marked False in ``text_mask``.
- **CLIP-L** (openai/clip-vit-large-patch14): the raw prompt, 77 tokens, ``pooler_output`` (final-LayerNorm state
  at the EOS token, 768-d, *not* passed through ``text_projection``).

Decisions on items the reference marks CONFLICT / UNVERIFIED:

- ComfyUI's native Kandinsky 5 text encoder takes the last decoder layer *before* the final norm, fixes the
  template typos and does not cap the prompt at 256 tokens. Cinetune follows the official code (normed output,
  typo'd template, 256 tokens) because that is what the released DiTs were trained and evaluated with.
- The crop is at a fixed token index per template, as in the official code: the token count of the template text
  before ``{}`` (up to and including ``<|im_start|>user\\n``), which with the official templates and the real tokenizer
  is exactly the official ``crop_start`` (``CROP_START``: 129/132/41, checked in the tests). The kept tokens are
  ``ids[crop : crop + 256]`` of the whole tokenized text, which is the official result for every prompt. This holds
  even when BPE merges across the boundary: a prompt that begins with whitespace containing a newline (``"\\n…"``,
  ``" \\n…"``, ``"\\n\\n…"``) merges that whitespace with the template's newline into one token at index
  ``crop - 1``, which is cut off with the template, so those leading newlines do not reach the DiT (officially too).
  Leading spaces, tabs and ``"\\r\\n"`` do not merge and are kept. ComfyUI instead searches for the user turn in the
  tokens, which keeps the merged token (one token more than official).
- ``hidden_states[-1]`` equals ``last_hidden_state`` (after the final norm) in the installed transformers; the
  tests check it. The encoder reads ``last_hidden_state`` directly.
- The Qwen forward pass gets no attention mask, as in the official code: the model is causal and the padding is
  on the right, so real tokens never see it.
- Every template keeps at most 256 prompt tokens. The official image models (T2I/I2I) allow a longer Qwen input
  (``max_length`` 512); Cinetune runs the video models, and the ``image`` template is there for completeness.

Files read (see :func:`load_k5_text_encoder`): Hugging Face snapshot folders, ComfyUI single files
(``qwen_2.5_vl_7b.safetensors``, ``qwen_2.5_vl_7b_fp8_scaled.safetensors``, ``clip_l.safetensors``). The layouts of
the single files come from ComfyUI's loaders (``comfy/sd.py`` ``detect_te_model``, ``comfy/text_encoders/llama.py``
``Qwen25_7BVLI``, ``comfy/clip_model.py``, ``comfy/ops.py`` scaled-fp8 ops, ``comfy/quant_ops.py``): the same tensor
names as the Hugging Face checkpoints (``model.layers.*`` / ``visual.*`` for Qwen, ``text_model.*`` for CLIP);
fp8-scaled files store fp8 weights with a per-tensor ``<layer>.scale_weight`` (older files, marked by a
``scaled_fp8`` tensor) or ``<layer>.weight_scale`` (newer files, with ``comfy_quant`` configs); the shared reader
(:mod:`cinetune.core.checkpoint`) finds the scales, and those layers stay fp8 as the DiT's
:class:`~cinetune.core.quant.FP8Linear` (weight ``fp8 · scale`` computed per call).
Single files carry no config: Qwen2.5-VL-7B and CLIP-L are recognised by their tensor shapes; other sizes take
head_dim 128 (Qwen2.5-VL) / 64 (CLIP), or a JSON text config in the safetensors metadata key ``config`` (which
Cinetune writes for its tiny test models).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..core.checkpoint import (
    COMFYUI_MARKER,
    Checkpoint,
    CheckpointError,
    assign_state_dict,
    check_materialised,
    hf_model_folder,
    describe_checkpoint,
    open_checkpoint,
)
from ..core.quant import check_fp8_device, quantize_linear_weights_fp8
from . import detect  # noqa: F401 - registers the Kandinsky 5 checkpoint kind for the messages below
from .conditioning import K5TextEmbeds

if TYPE_CHECKING:  # heavy imports stay lazy so importing the node pack stays fast
    from transformers import CLIPTextModel, PreTrainedTokenizerBase, Qwen2_5_VLTextModel

_VIDEO_TAIL = [
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of "
    "animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
    "<|im_start|>user\n{}<|im_end|>",
]

#: Official Kandinsky 5 Qwen prompt templates (kandinskylab/kandinsky-5 ``text_embedders.py``), typos included.
TEMPLATES: dict[str, str] = {
    "video": "\n".join([
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
        "Describe the location of the video, main characters or objects and their action.",
        *_VIDEO_TAIL,
    ]),
    "image2video": "\n".join([
        "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and effective video "
        "description based on a provided input image.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
        "Describe main characters actions.",
        *_VIDEO_TAIL,
    ]),
    "image": "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, size, "
             "texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
             "<|im_start|>user\n{}<|im_end|>",
}

#: Official ``crop_start`` per template: tokens up to and including ``<|im_start|>user\n`` with the real Qwen2.5
#: tokenizer. Documentation and test reference only; the encoder counts the tokens of the template text before ``{}``,
#: which gives these values.
CROP_START: dict[str, int] = {"video": 129, "image2video": 132, "image": 41}

#: Prompt tokens kept after the crop (prompt + ``<|im_end|>``), official ``max_length - crop_start``.
MAX_PROMPT_TOKENS = 256

#: CLIP context length (openai/clip-vit-large-patch14).
CLIP_MAX_LENGTH = 77

#: Text config of Qwen2.5-VL-7B-Instruct (Hugging Face ``Qwen/Qwen2.5-VL-7B-Instruct`` config.json; the same numbers
#: are in ComfyUI's ``Qwen25_7BVLI_Config``). Used for single files, which carry no config.
QWEN25_VL_7B_TEXT_CONFIG: dict = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643, "eos_token_id": 151645,
}

#: Text config of openai/clip-vit-large-patch14 (ComfyUI ``comfy/sd1_clip_config.json`` has the same numbers).
CLIP_L_TEXT_CONFIG: dict = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}

_QWEN_OUTER_PREFIXES = ("text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.")
_CLIP_OUTER_PREFIXES = ("text_encoders.clip_l.transformer.", "clip_l.transformer.", "cond_stage_model.transformer.",
                        "conditioner.embedders.0.transformer.")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# ----------------------------------------------------------------------------------------------------------------
# Recognising files


def _weight_files(folder: Path) -> list[Path]:
    """Safetensors files of a Hugging Face folder (from the shard index when present)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("*.bin"))
        hint = f" (found {bins[0].name}: convert it to safetensors)" if bins else ""
        raise CheckpointError(f"{folder}: no .safetensors weights in this folder{hint}.")
    return files


def _open_weights(path, config_types: tuple[str, ...], key_of) -> tuple[Path, Path | None, Checkpoint, Checkpoint]:
    """Locate a text encoder's weight files (a Hugging Face folder of ``config_types``, or one file) and open them.

    Returns:
        ``(path, folder or None, the files as stored, the view renamed by key_of to model names)``; ``key_of(name)``
        gives the model name of a stored tensor (scales follow their weights) or None for tensors not used.
    Raises:
        CheckpointError: the path does not exist, a file is not safetensors, or a header cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found.")
    folder = hf_model_folder(path, config_types, f"one of {list(config_types)}")
    files = _weight_files(folder) if folder else [path]
    for f in files:
        if f.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{f}: expected a .safetensors file; other formats are not read for text encoders.")
    stored = open_checkpoint(files)
    return path, folder, stored, stored.rename(key_of)


def _fill_text_model(model: torch.nn.Module, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device,
                     path: Path) -> None:
    """Load ``ckpt`` (names = the model's state-dict names) into a meta-device text model.

    Every Linear the file stores in fp8 (any layout :attr:`~cinetune.core.checkpoint.Checkpoint.fp8` reads, ComfyUI's
    ``*_fp8_scaled`` text encoders among them) becomes an :class:`~cinetune.core.quant.FP8Linear` holding the stored
    codes and float32 scale (weight-only: dequantised per call in the compute dtype, as the DiT's), so an fp8 file
    takes about half the memory of a bf16 one. Every other tensor (fp8 embeddings included, dequantised) is cast to
    ``dtype``; tensors are read one by one.

    Raises:
        CheckpointError: a damaged fp8 layout or unsupported quantisation (NVFP4), missing/unexpected tensors.
        FP8DeviceError: fp8 layers and a device that cannot cast float8.
    """
    scheme = ckpt.fp8
    modules = dict(model.named_modules())
    fp8 = {layer.layer for layer in scheme.layers.values() if isinstance(modules.get(layer.layer), torch.nn.Linear)}
    if fp8:
        check_fp8_device(device)
        quantize_linear_weights_fp8(model, keep=lambda name: name not in fp8)  # meta: structure only

    def policy(name, info):
        layer = scheme.layers.get(name)
        return None if layer is not None and layer.layer in fp8 else dtype

    assign_state_dict(model, ckpt.load(dtype=policy), path)


def _first(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" …" if len(names) > n else "") if names else "none"


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL language model


def _qwen_model_key(name: str) -> str | None:
    """Map a checkpoint tensor name to a ``Qwen2_5_VLTextModel`` name; None for tensors the encoder does not use.

    Accepted layouts: published HF (``model.layers.*``, ``visual.*``, ``lm_head.*``), transformers ≥ 4.52 saves
    (``model.language_model.*``, ``model.visual.*``), ComfyUI single files (HF names, optionally under
    ``qwen25_7b.transformer.``). fp8 scales and configs map like their weights; the ``scaled_fp8`` marker stays.
    """
    for p in _QWEN_OUTER_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    for p in ("model.language_model.", "language_model.model.", "language_model."):
        if name.startswith(p):
            return name[len(p):]
    if name.startswith(("visual.", "model.visual.", "lm_head.")):
        return None
    if name.startswith("model."):
        return name[len("model."):]
    return name


def qwen_text_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict:
    """Build a Qwen2.5-VL text config (HF field names) from the language-model tensor shapes.

    Args:
        shapes: ``Qwen2_5_VLTextModel`` tensor names (``embed_tokens.weight``, ``layers.{i}.…``) → shape.
    Returns:
        ``QWEN25_VL_7B_TEXT_CONFIG`` when the shapes are those of the 7B; otherwise a config with head_dim 128
        (every published Qwen2.5-VL size uses 128) and the sizes read from the shapes.
    Raises:
        CheckpointError: the hidden size is not a multiple of 128 (head count cannot be derived) or tensors are
            missing.
    """
    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        intermediate = shapes["layers.0.mlp.gate_proj.weight"][0]
        kv_out = shapes["layers.0.self_attn.k_proj.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"Qwen2.5 language-model tensor {e} is missing.") from None
    layers = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("layers."))
    cfg = QWEN25_VL_7B_TEXT_CONFIG
    if (vocab, hidden, intermediate, layers, kv_out) == (cfg["vocab_size"], cfg["hidden_size"],
                                                         cfg["intermediate_size"], cfg["num_hidden_layers"],
                                                         cfg["num_key_value_heads"] * 128):
        return dict(cfg)
    if hidden % 128 or kv_out % 128:
        raise CheckpointError(
            f"Cannot derive the attention head count of a Qwen model with hidden size {hidden}: "
            "use the Hugging Face folder (with config.json) instead of a single file.")
    return {**cfg, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "num_key_value_heads": kv_out // 128}


def load_qwen_text_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                         device: str | torch.device = "cpu") -> "Qwen2_5_VLTextModel":
    """Load only the language model of a Qwen2.5-VL checkpoint (the vision tower is never read).

    Args:
        path: a Hugging Face snapshot folder (config.json of ``model_type`` ``qwen2_5_vl`` + safetensors shards,
            optionally ``model.safetensors.index.json``), a file inside one, or a single ``.safetensors`` file
            in ComfyUI's layout (bf16/fp16, or fp8 with per-layer scales).
        dtype: compute dtype: every tensor is cast to it, except the Linear layers an fp8 file stores in fp8, which
            stay fp8 as :class:`~cinetune.core.quant.FP8Linear` (dequantised per call; about half the memory).
        device: where the model ends up.
    Returns:
        ``transformers.Qwen2_5_VLTextModel`` in eval mode (``last_hidden_state`` is after the final RMSNorm).
    Raises:
        CheckpointError: missing/truncated file, not a Qwen2.5 language model (the message says what it looks
            like), tensors that do not fit the config, a damaged fp8 layout or an unsupported one (NVFP4).
        FP8DeviceError: an fp8 file and a device that cannot cast float8 (load on the CPU or CUDA).
    """
    from transformers import AutoConfig

    try:
        from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
    except ImportError as e:
        raise ImportError("Loading Qwen2.5-VL needs transformers >= 4.52 (Qwen2_5_VLTextModel); "
                          "upgrade it with pip install -U transformers.") from e

    path, folder, stored, ckpt = _open_weights(path, ("qwen2_5_vl", "qwen2_5_vl_text"), _qwen_model_key)
    if "embed_tokens.weight" not in ckpt or "layers.0.self_attn.k_proj.bias" not in ckpt:
        what = describe_checkpoint({n: i.shape for n, i in stored.infos.items()})
        raise CheckpointError(
            f"{path}: this looks like {what}, not Qwen2.5-VL. Expected Qwen2.5-VL-7B-Instruct: its Hugging Face "
            "folder, or ComfyUI's qwen_2.5_vl_7b(_fp8_scaled).safetensors in models/text_encoders.")
    if folder is not None:
        config = AutoConfig.from_pretrained(folder)
        config = getattr(config, "text_config", config)
    else:
        shapes = {n: i.shape for n, i in ckpt.model_infos().items()}
        config = Qwen2_5_VLTextConfig(**(ckpt.config() or qwen_text_config_from_shapes(shapes)))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(config)
    _fill_text_model(model, ckpt, dtype, torch.device(device), path)
    model.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=config)  # its buffers are not in checkpoints
    check_materialised(model)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------------
# CLIP-L text tower


def _clip_model_key(name: str) -> str | None:
    """Map a checkpoint tensor name to a canonical CLIP text name (``embeddings.*``, ``encoder.*``,
    ``final_layer_norm.*``, without ``text_model.``); None for tensors the encoder does not use (vision tower,
    projections, ``logit_scale``, the ``position_ids`` buffer)."""
    for p in _CLIP_OUTER_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    if name.startswith("text_model."):
        name = name[len("text_model."):]
    if name == COMFYUI_MARKER:
        return name
    if name == "embeddings.position_ids":
        return None
    if not name.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return None
    return name


def clip_text_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict:
    """Build a CLIP text config from canonical CLIP text tensor shapes (see ``_clip_model_key``).

    Returns ``CLIP_L_TEXT_CONFIG`` for CLIP-L's shapes; for other sizes head_dim 64 (OpenAI CLIP text towers:
    L 768/12, H 1024/16, G 1280/20) and quick_gelu.
    Raises:
        CheckpointError: tensors missing or a hidden size that is not a multiple of 64.
    """
    try:
        vocab, hidden = shapes["embeddings.token_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0]
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"CLIP text tensor {e} is missing.") from None
    layers = 1 + max(int(n.split(".")[2]) for n in shapes if n.startswith("encoder.layers."))
    if hidden % 64:
        raise CheckpointError(f"Cannot derive the head count of a CLIP text model with hidden size {hidden}: "
                              "use its Hugging Face folder (with config.json).")
    return {**CLIP_L_TEXT_CONFIG, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "max_position_embeddings": positions}


def load_clip_text_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                         device: str | torch.device = "cpu") -> "CLIPTextModel":
    """Load the text tower of a CLIP checkpoint.

    Args:
        path: a Hugging Face folder (``clip`` full model or ``clip_text_model``) or a file in one, or a single
            ``.safetensors`` with ``text_model.*`` tensors (ComfyUI ``clip_l.safetensors``; prefixes such as
            ``clip_l.transformer.`` are removed).
        dtype, device: compute dtype (fp8 Linear layers of an fp8 file stay fp8, as in
            :func:`load_qwen_text_model`) and device.
    Returns:
        ``transformers.CLIPTextModel`` in eval mode.
    Raises:
        CheckpointError: missing/truncated file, not a CLIP text encoder (says what it looks like), a damaged or
            unsupported fp8 layout.
    """
    from transformers import AutoConfig, CLIPTextConfig, CLIPTextModel

    path, folder, stored, ckpt = _open_weights(path, ("clip", "clip_text_model"), _clip_model_key)
    if "embeddings.token_embedding.weight" not in ckpt or "final_layer_norm.weight" not in ckpt:
        what = describe_checkpoint({n: i.shape for n, i in stored.infos.items()})
        raise CheckpointError(
            f"{path}: this looks like {what}, not a CLIP text encoder. Expected CLIP-L: clip_l.safetensors or the "
            "openai/clip-vit-large-patch14 folder in models/text_encoders.")
    if folder is not None:
        config = AutoConfig.from_pretrained(folder)
        config = getattr(config, "text_config", config)
    else:
        shapes = {n: i.shape for n, i in ckpt.model_infos().items()}
        config = CLIPTextConfig(**(ckpt.config() or clip_text_config_from_shapes(shapes)))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = CLIPTextModel(config)
    # transformers < 5 nests the tower under ``text_model.``; 5.x does not.
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    if nested:
        ckpt = ckpt.rename(lambda n: n if n == COMFYUI_MARKER else "text_model." + n)
    _fill_text_model(model, ckpt, dtype, torch.device(device), path)
    embeddings = model.text_model.embeddings if nested else model.embeddings
    embeddings.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
    check_materialised(model)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def load_qwen_tokenizer(folder: str | os.PathLike) -> "PreTrainedTokenizerBase":
    """Open a Qwen2/2.5 tokenizer folder (``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` as in ComfyUI's
    ``comfy/text_encoders/qwen25_tokenizer``).

    Raises:
        CheckpointError: the folder has no tokenizer files or the tokenizer lacks Qwen's chat tokens.
    """
    from transformers import AutoTokenizer, Qwen2Tokenizer

    folder = Path(folder)
    if not folder.is_dir() or not _has_tokenizer(folder):
        raise CheckpointError(f"{folder}: no Qwen tokenizer here (expected tokenizer.json or vocab.json + merges.txt).")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError):
        tok = Qwen2Tokenizer.from_pretrained(str(folder))
    for special in ("<|im_start|>", "<|im_end|>"):
        if tok.convert_tokens_to_ids(special) in (None, tok.unk_token_id):
            raise CheckpointError(f"{folder}: tokenizer has no {special} token; it is not a Qwen2.5 tokenizer.")
    return tok


def load_clip_tokenizer(folder: str | os.PathLike) -> "PreTrainedTokenizerBase":
    """Open a CLIP BPE tokenizer folder (``vocab.json`` + ``merges.txt``, e.g. ComfyUI's ``comfy/sd1_tokenizer``).

    Raises:
        CheckpointError: no tokenizer files, or no ``<|startoftext|>`` token.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir() or not _has_tokenizer(folder):
        raise CheckpointError(f"{folder}: no CLIP tokenizer here (expected vocab.json + merges.txt).")
    tok = CLIPTokenizer.from_pretrained(str(folder))
    if tok.convert_tokens_to_ids("<|startoftext|>") in (None, tok.unk_token_id):
        raise CheckpointError(f"{folder}: tokenizer has no <|startoftext|> token; it is not a CLIP tokenizer.")
    return tok


def _resolve_tokenizer_folder(model_path: Path, explicit: str | os.PathLike | None, what: str, hint: str) -> Path:
    own = model_path if model_path.is_dir() else model_path.parent
    if (own / "config.json").is_file() and _has_tokenizer(own):
        return own
    if explicit is not None:
        return Path(explicit)
    raise CheckpointError(
        f"{model_path}: a single-file {what} needs its tokenizer: pass {hint} (a folder with tokenizer.json or "
        "vocab.json + merges.txt), or use the Hugging Face folder, which has the tokenizer files.")


# ----------------------------------------------------------------------------------------------------------------
# Prompt → token ids


def qwen_prompt_ids(tokenizer: "PreTrainedTokenizerBase", prompt: str, template_text: str) -> tuple[list[int], int]:
    """Token ids of ``prompt`` inside a Qwen chat template, cut to at most ``MAX_PROMPT_TOKENS`` after the crop.

    The crop is the official fixed position (kandinskylab/kandinsky-5 ``kandinsky/models/text_embedders.py``:
    ``hidden_states[-1][:, crop_start:]`` with ``max_length = crop_start + 256``): the number of tokens of the template
    text before ``{}``. See the module notes for prompts whose leading newlines merge with the template's.

    Args:
        tokenizer: a Qwen2.5 tokenizer.
        prompt: user text, inserted verbatim at the template's ``{}``.
        template_text: a template with exactly one ``{}`` (see ``TEMPLATES``).
    Returns:
        ``(ids, crop)``: ``ids`` = the tokenized template with the prompt, cut after ``crop + 256`` tokens;
        ``ids[crop:]`` = the tokens the DiT receives: the prompt's tokens and the closing ``<|im_end|>`` (which a
        prompt of ≥ 256 tokens loses, as in the official code). ``crop`` is ``CROP_START[name]`` for the official
        templates.
    Raises:
        ValueError: the template has not exactly one ``{}``.
    """
    if template_text.count("{}") != 1:
        raise ValueError("A Qwen template needs exactly one '{}' where the prompt goes.")
    before, after = template_text.split("{}")
    crop = len(tokenizer(before, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(before + prompt + after, add_special_tokens=False)["input_ids"])
    return ids[: crop + MAX_PROMPT_TOKENS], crop


# ----------------------------------------------------------------------------------------------------------------
# The encoder


class K5TextEncoder:
    """Qwen2.5-VL language model + CLIP-L text tower with their tokenizers, producing :class:`K5TextEmbeds`.

    Args:
        qwen: ``Qwen2_5_VLTextModel`` (language model only; the vision tower is not needed for text).
        qwen_tokenizer: its tokenizer.
        clip: ``CLIPTextModel``.
        clip_tokenizer: its tokenizer.
    Both models must be on the same device; :meth:`to` moves them together.
    """

    def __init__(self, qwen: "Qwen2_5_VLTextModel", qwen_tokenizer: "PreTrainedTokenizerBase",
                 clip: "CLIPTextModel", clip_tokenizer: "PreTrainedTokenizerBase"):
        self.qwen = qwen
        self.qwen_tokenizer = qwen_tokenizer
        self.clip = clip
        self.clip_tokenizer = clip_tokenizer
        vocab = qwen.get_input_embeddings().num_embeddings
        if len(qwen_tokenizer) > vocab:
            raise ValueError(f"The Qwen tokenizer has {len(qwen_tokenizer)} tokens but the model only {vocab}: "
                             "tokenizer and model do not belong together.")
        clip_vocab = clip.get_input_embeddings().num_embeddings
        if len(clip_tokenizer) > clip_vocab:
            raise ValueError(f"The CLIP tokenizer has {len(clip_tokenizer)} tokens but the model only {clip_vocab}.")

    @property
    def device(self) -> torch.device:
        """Device of the models (and of :meth:`encode`'s outputs)."""
        return self.qwen.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the Qwen model."""
        return self.qwen.get_input_embeddings().weight.dtype

    @property
    def text_dim(self) -> int:
        """Qwen hidden size (3584 for the 7B): the DiT's ``in_text_dim``."""
        return self.qwen.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        """CLIP hidden size (768 for CLIP-L): the DiT's ``in_text_dim2``."""
        return self.clip.config.hidden_size

    def to(self, device: str | torch.device) -> "K5TextEncoder":
        """Move both models to ``device`` (e.g. to the GPU to encode, back to ``"cpu"`` to free it); returns self."""
        self.qwen.to(device)
        self.clip.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str], template: str = "video") -> K5TextEmbeds:
        """Encode prompts for the Kandinsky 5 DiT.

        Args:
            prompts: B prompt strings (empty strings are allowed: they keep only ``<|im_end|>``).
            template: key of ``TEMPLATES``: ``"video"`` (official for text- and image-to-video), ``"image2video"``,
                ``"image"``.
        Returns:
            ``K5TextEmbeds`` with float32 tensors on :attr:`device`: ``text`` ``[B, L, text_dim]`` (Qwen last hidden
            state after the final norm, from the user turn on; L = longest kept prompt, ≤ 256), ``text_mask``
            ``[B, L]`` bool (False on right padding, whose features are zero), ``pooled`` ``[B, pooled_dim]`` (CLIP
            ``pooler_output``, not projected).
        Raises:
            ValueError: unknown template, or ``prompts`` not a non-empty list of strings.
        """
        if template not in TEMPLATES:
            raise ValueError(f"Unknown template '{template}'; use one of {list(TEMPLATES)}.")
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings, e.g. ['a cat walks'].")
        device = self.device

        encoded = [qwen_prompt_ids(self.qwen_tokenizer, p, TEMPLATES[template]) for p in prompts]
        pad_id = self.qwen_tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        total = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
        for b, (ids, _) in enumerate(encoded):
            input_ids[b, : len(ids)] = torch.tensor(ids)
        hidden = self.qwen(input_ids=input_ids.to(device), use_cache=False).last_hidden_state

        lengths = [len(ids) - crop for ids, crop in encoded]
        text = torch.zeros(len(prompts), max(lengths), hidden.shape[-1], dtype=torch.float32, device=device)
        mask = torch.zeros(len(prompts), max(lengths), dtype=torch.bool, device=device)
        for b, ((ids, crop), n) in enumerate(zip(encoded, lengths)):
            text[b, :n] = hidden[b, crop: crop + n].float()
            mask[b, :n] = True

        clip_ids = self.clip_tokenizer(prompts, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True,
                                       return_tensors="pt")["input_ids"]
        pooled = self.clip(input_ids=clip_ids.to(device)).pooler_output.float()
        return K5TextEmbeds(text=text, text_mask=mask, pooled=pooled)


def load_k5_text_encoder(qwen_path: str | os.PathLike, clip_path: str | os.PathLike, *,
                         qwen_tokenizer: str | os.PathLike | None = None,
                         clip_tokenizer: str | os.PathLike | None = None,
                         dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> K5TextEncoder:
    """Load Qwen2.5-VL-7B (language model) and CLIP-L for Kandinsky 5.

    Args:
        qwen_path: Hugging Face snapshot folder of Qwen2.5-VL-7B-Instruct or any file in it, or ComfyUI's single
            file ``qwen_2.5_vl_7b.safetensors`` / ``qwen_2.5_vl_7b_fp8_scaled.safetensors`` (fp8 layers stay fp8).
        clip_path: Hugging Face CLIP folder (full CLIP or text model) or a file in it, or single-file
            ``clip_l.safetensors`` (``text_model.*`` tensors).
        qwen_tokenizer: tokenizer folder used when ``qwen_path`` has no tokenizer of its own (single files), e.g.
            ComfyUI's ``comfy/text_encoders/qwen25_tokenizer``. A snapshot folder's own tokenizer takes precedence.
        clip_tokenizer: same for CLIP, e.g. ComfyUI's ``comfy/sd1_tokenizer``.
        dtype: compute dtype of both models (bf16 as officially; fp32 for exact tests).
        device: where the models are placed.
    Returns:
        A :class:`K5TextEncoder`.
    Raises:
        CheckpointError: missing/truncated/foreign files (the message says what a file looks like), or a single
            file without a tokenizer folder (the message says which argument to pass).
    """
    qwen_path, clip_path = Path(qwen_path), Path(clip_path)
    qtok = load_qwen_tokenizer(_resolve_tokenizer_folder(
        qwen_path, qwen_tokenizer, "Qwen text encoder",
        "qwen_tokenizer (ComfyUI: comfy/text_encoders/qwen25_tokenizer)"))
    ctok = load_clip_tokenizer(_resolve_tokenizer_folder(
        clip_path, clip_tokenizer, "CLIP text encoder", "clip_tokenizer (ComfyUI: comfy/sd1_tokenizer)"))
    qwen = load_qwen_text_model(qwen_path, dtype=dtype, device=device)
    clip = load_clip_text_model(clip_path, dtype=dtype, device=device)
    return K5TextEncoder(qwen, qtok, clip, ctok)
