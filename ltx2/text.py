"""LTX-2 text encoding: Gemma 3 12B (text part, via ``transformers``), tokenization, the "V1" feature extractor,
and the handle that bundles them with the text projection and connectors (:mod:`cinetune.ltx2.connectors`).

What the DiT receives (ltx2.md §3; Lightricks/LTX-2 at 2026-02-09, ``packages/ltx-core/src/ltx_core/text_encoders/
gemma/``: ``tokenizer.py``, ``encoders/base_encoder.py``, ``encoders/av_encoder.py``, ``config.py``):

1. **Tokens** (``LTXVGemmaTokenizer``, max_length 1024): ``text.strip()``, the Gemma 3 tokenizer with its ``<bos>``
   (id 2), no chat template, no EOS, padded to exactly 1024 tokens on the **left** with pad id 0, truncated to 1024
   (the first 1024 tokens are kept).
2. **Gemma 3 12B** forward with the attention mask and ``output_hidden_states``: 49 hidden states ``[B, T, 3840]`` —
   the embedding output (× √3840) and every layer's output, the last one after the final RMSNorm (transformers
   semantics; the tests check it).
3. **Feature extractor V1** (``base_encoder.py`` ``_norm_and_concat_padded_batch``): per sample and per hidden state,
   over the valid tokens only, ``mean`` over (tokens, channels), ``min``/``max`` likewise;
   ``8·(x − mean)/(max − min + 1e-6)`` (the mean divides by ``n·D + 1e-6``); flattened to ``[B, T, 3840·49]``
   with the hidden-state index fastest (flat index ``d·49 + l``); padded positions set to 0.
4. ``text_embedding_projection.aggregate_embed`` (Linear 188160 → 3840, no bias) → features ``[B, 1024, 3840]`` and
   the token mask: :func:`encode_prompts`. These are what training caches store.
5. The two connectors → video and audio contexts (:meth:`LTX2TextEncoder.encode`).

Decisions:

- The feature statistics are computed in float32 (the official code computes them in the model dtype, bf16) and
  cast once to the projection's dtype; the difference is within bf16 rounding.
- Prompts are encoded as one batch; every prompt is padded to the same 1024 tokens, so the result equals the
  official one-prompt-at-a-time loop. Positions are transformers' default (``0 … 1023`` including the padding), as
  in the official call that passes only ``input_ids`` and ``attention_mask``.
- Only the text model is built (``Gemma3TextModel``); vision tower, projector and ``lm_head`` tensors are skipped.
  The vision tower serves only prompt enhancement, which is not part of this module.

Files read (:func:`load_gemma_text_model`):

- Hugging Face folders: ``google/gemma-3-12b-it-qat-q4_0-unquantized`` (what LTX-2 names; ``config.json`` of
  ``model_type`` ``gemma3``, five ``model-0000X-of-00005.safetensors`` shards with ``language_model.model.*``,
  ``vision_tower.*``, ``multi_modal_projector.*``), folders saved by current transformers (``model.language_model.*``)
  and text-only ``gemma3_text`` folders (``model.*``).
- ComfyUI single files ``gemma_3_12B_it.safetensors`` / ``gemma_3_12B_it_fp8_scaled.safetensors`` (Comfy-Org/ltx-2
  ``split_files/text_encoders``; layout from ComfyUI ``comfy/sd.py`` ``detect_te_model`` and
  ``comfy/text_encoders/lt.py``): ``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``, plus
  unused ``vision_model.*`` / ``multi_modal_projector.*`` / ``spiece_model``. fp8 files store float8_e4m3fn Linear
  weights with a per-tensor float32 ``<layer>.weight_scale`` (and ``<layer>.comfy_quant`` naming the format,
  ``<layer>.input_scale`` for ComfyUI's fp8 matmul), or the older ``<layer>.scale_weight`` with a ``scaled_fp8``
  marker. Those layers become :class:`cinetune.core.quant.FP8Linear` (weight-only fp8, input scales unused), or are
  dequantised with ``keep_fp8=False``. Other packed formats (``gemma_3_12B_it_fp4_mixed``) are refused.
  Single files carry no config: it comes from the shapes (head_dim from ``q_norm``, heads from ``q_proj``) with the
  Gemma 3 12B values of ``config.py`` for the rest, or from a JSON text config in the metadata key ``config``.
  They carry no ``tokenizer.json`` either (ComfyUI reads the SentencePiece bytes stored as ``spiece_model``): pass
  the tokenizer folder.

Tensors are read one at a time by :func:`cinetune.core.checkpoint.open_checkpoint` (no memory map; straight to the
target device), which also recognises the fp8 layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import torch

from ..core.checkpoint import (
    Checkpoint,
    CheckpointError,
    TensorInfo,
    assign_state_dict,
    check_materialised,
    hf_model_folder,
    describe_checkpoint,
    is_fp8_code,
    open_checkpoint,
    save_file_atomic,
)
from ..core.quant import quantize_linear_weights_fp8
from .config import tiny_transformer_metadata
from .connectors import FILE_PREFIXES, LTX2TextProjection, text_projection_config

if TYPE_CHECKING:  # transformers is imported lazily so importing the node pack stays fast
    from transformers import Gemma3TextModel, PreTrainedTokenizerBase

#: Token count of every encoded prompt (official ``LTXVGemmaTokenizer(tokenizer_root, 1024)``).
MAX_LENGTH = 1024
#: Feature extractor V1 constants: scale 8 and epsilon 1e-6 (``_norm_and_concat_padded_batch``).
FEATURE_SCALE = 8.0
FEATURE_EPS = 1e-6

#: Official LTX-2 default negative prompt (Lightricks/LTX-2 ``packages/ltx-pipelines/src/ltx_pipelines/utils/
#: constants.py`` ``DEFAULT_NEGATIVE_PROMPT`` of the 19B releases, 2026-01-05 to 2026-02-09; later versions for
#: LTX-2.3 prepend "has_subtitles, has_blurbox, …").
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, out of focus, overexposed, underexposed, low contrast, washed out colors, excessive noise, "
    "grainy texture, poor lighting, flickering, motion blur, distorted proportions, unnatural skin tones, "
    "deformed facial features, asymmetrical face, missing facial features, extra limbs, disfigured hands, "
    "wrong hand count, artifacts around text, inconsistent perspective, camera shake, incorrect depth of "
    "field, background too sharp, background clutter, distracting reflections, harsh shadows, inconsistent "
    "lighting direction, color banding, cartoonish rendering, 3D CGI look, unrealistic materials, uncanny "
    "valley effect, incorrect ethnicity, wrong gender, exaggerated expressions, wrong gaze direction, "
    "mismatched lip sync, silent or muted audio, distorted voice, robotic voice, echo, background noise, "
    "off-sync audio, incorrect dialogue, added dialogue, repetitive speech, jittery movement, awkward "
    "pauses, incorrect timing, unnatural transitions, inconsistent framing, tilted camera, flat lighting, "
    "inconsistent tone, cinematic oversaturation, stylized filters, or AI artifacts."
)

#: Text config of Gemma 3 12B as LTX-2 builds it (Lightricks/LTX-2 ``text_encoders/gemma/config.py``
#: ``Gemma3TextConfig``; transformers field names, the older rope keys are converted by ``Gemma3TextConfig``).
GEMMA3_12B_TEXT_CONFIG: dict = {
    "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
    "sliding_window": 1024, "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
}

#: (hidden size, layers) of the published Gemma 3 text models, for error messages.
GEMMA3_SIZES: dict[tuple[int, int], str] = {
    (640, 18): "Gemma 3 270M", (1152, 26): "Gemma 3 1B", (2560, 34): "Gemma 3 4B", (3840, 48): "Gemma 3 12B",
    (5376, 62): "Gemma 3 27B",
}

EXPECTED_GEMMA = ("Gemma 3 12B (hidden size 3840, 48 layers): ComfyUI's gemma_3_12B_it(_fp8_scaled).safetensors in "
                  "models/text_encoders, or the google/gemma-3-12b-it-qat-q4_0-unquantized folder")

_GEMMA_CONFIG_TYPES = ("gemma3", "gemma3_text")
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.", "")
_HIGH_PRECISION_CODES = ("F32", "F16", "BF16")
_FP8_CODES = ("F8_E4M3", "F8_E5M2")
_LINEAR_SUFFIXES = tuple(f".{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

# ----------------------------------------------------------------------------------------------------------------
# Files


def _open_gemma(path: Path, folder: Path | None) -> Checkpoint:
    """The weight files of a Hugging Face folder (its shard index when present) or the single file."""
    if folder is None:
        return open_checkpoint(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return open_checkpoint(index)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights in this folder.")
    return open_checkpoint(files)


# ----------------------------------------------------------------------------------------------------------------
# Gemma 3: recognising and configuring


def gemma_text_prefix(names: Iterable[str]) -> str | None:
    """The prefix in front of the ``Gemma3TextModel`` names in a checkpoint (``"language_model.model."`` published
    ``Gemma3ForConditionalGeneration``, ``"model.language_model."`` current transformers saves, ``"model."``
    ``Gemma3ForCausalLM`` and ComfyUI single files, ``""`` a bare text model), or None when there is no
    ``embed_tokens.weight``."""
    names = set(names)
    return next((p for p in _TEXT_PREFIXES if p + "embed_tokens.weight" in names), None)


def _layer_count(shapes: Mapping[str, Sequence[int]]) -> int:
    indices = {int(n.split(".")[1]) for n in shapes if n.startswith("layers.")}
    return max(indices) + 1 if indices else 0


def gemma_text_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict:
    """A Gemma 3 text config (transformers field names) from ``Gemma3TextModel`` tensor shapes.

    Sizes come from the shapes: vocabulary and hidden size (``embed_tokens``), layers, head_dim (``q_norm``), query
    and key/value heads (``q_proj``/``k_proj`` rows ÷ head_dim), MLP width (``gate_proj``); everything else, and
    ``query_pre_attn_scalar`` = head_dim (its value in Gemma 3 1B/4B/12B), as in :data:`GEMMA3_12B_TEXT_CONFIG`.

    Raises:
        CheckpointError: a tensor needed for a size is missing.
    """
    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
        q_rows = shapes["layers.0.self_attn.q_proj.weight"][0]
        kv_rows = shapes["layers.0.self_attn.k_proj.weight"][0]
        intermediate = shapes["layers.0.mlp.gate_proj.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"Gemma 3 tensor {e} is missing; the file is incomplete.") from None
    return {**GEMMA3_12B_TEXT_CONFIG, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": _layer_count(shapes), "num_attention_heads": q_rows // head_dim,
            "num_key_value_heads": kv_rows // head_dim, "head_dim": head_dim, "query_pre_attn_scalar": head_dim}


def check_gemma3_12b(hidden_size: int, num_layers: int, source: str | os.PathLike = "text encoder") -> None:
    """Raise :class:`CheckpointError` unless the Gemma 3 text model is the 12B (hidden 3840, 48 layers) that the
    LTX-2 text projection was trained on; the message names the model found."""
    if (hidden_size, num_layers) == (3840, 48):
        return
    name = GEMMA3_SIZES.get((hidden_size, num_layers), "a Gemma 3 text model")
    raise CheckpointError(f"{source}: this is {name} (hidden size {hidden_size}, {num_layers} layers), but LTX-2 "
                          f"needs {EXPECTED_GEMMA}.")


def _check_stored_dtypes(infos: Mapping[str, TensorInfo], source: str) -> None:
    odd = [f"{n} ({i.dtype})" for n, i in infos.items() if i.dtype not in _HIGH_PRECISION_CODES + _FP8_CODES]
    if odd:
        raise CheckpointError(
            f"{source}: tensors stored in a format this loader does not read: {', '.join(odd[:3])}"
            f"{' …' if len(odd) > 3 else ''} (packed fp4 / int8 files such as gemma_3_12B_it_fp4_mixed). Use the "
            "bf16 or fp8_scaled file.")


# ----------------------------------------------------------------------------------------------------------------
# Gemma 3: loading


def load_gemma_text_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                          device: str | torch.device = "cpu", keep_fp8: bool = True,
                          expect_12b: bool = True) -> "Gemma3TextModel":
    """Load the text model of a Gemma 3 checkpoint (see the module docstring for the layouts).

    Args:
        path: a Hugging Face folder (or a file in one) or a single ``.safetensors`` file.
        dtype: dtype of the high-precision parameters.
        device: where the model ends up (tensors are read one at a time straight to it).
        keep_fp8: Linear weights stored as float8_e4m3fn stay fp8 in :class:`~cinetune.core.quant.FP8Linear`
            layers (dequantised per call, half the memory); False dequantises them to ``dtype`` on load.
        expect_12b: refuse anything but Gemma 3 12B (:func:`check_gemma3_12b`); tests turn it off for tiny models.
    Returns:
        ``transformers.Gemma3TextModel`` in eval mode without gradients (``hidden_states[-1]`` is after the final
        norm).
    Raises:
        CheckpointError: missing or truncated file, not a Gemma 3 text model (the message says what it looks like),
            a Gemma 3 of another size while ``expect_12b``, unsupported quantisation, tensors that do not fit.
    """
    from transformers import AutoConfig, Gemma3TextConfig, Gemma3TextModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found.")
    folder = hf_model_folder(path, _GEMMA_CONFIG_TYPES, EXPECTED_GEMMA)
    ckpt = _open_gemma(path, folder)
    prefix = gemma_text_prefix(ckpt.infos)
    text = ckpt.select(prefix or "")
    if prefix is None or not {"layers.0.self_attn.q_norm.weight",
                              "layers.0.post_feedforward_layernorm.weight"} <= set(text.infos):
        what = describe_checkpoint({n: i.shape for n, i in ckpt.infos.items()})
        raise CheckpointError(f"{path}: this looks like {what}, not a Gemma 3 text model. Expected {EXPECTED_GEMMA}.")

    if folder is not None:
        config = AutoConfig.from_pretrained(folder)
        config = getattr(config, "text_config", None) or config
    else:
        shapes = {n: i.shape for n, i in text.infos.items()}
        config = Gemma3TextConfig(**(ckpt.config()
                                     or gemma_text_config_from_shapes(shapes)))
    if expect_12b:
        check_gemma3_12b(config.hidden_size, config.num_hidden_layers, path)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Gemma3TextModel(config)
    names = [n for n in model.state_dict() if n in text.infos]
    _check_stored_dtypes({n: text.infos[n] for n in names}, ckpt.source)

    fp8 = text.fp8.layers  # weight name → FP8Layer; raises for damaged or unsupported quantisation
    kept = {n[: -len(".weight")] for n, layer in fp8.items()
            if keep_fp8 and layer.dtype == "F8_E4M3" and n[: -len(".weight")].endswith(_LINEAR_SUFFIXES)}
    if kept:
        quantize_linear_weights_fp8(model, keep=lambda name: name not in kept)
    state = text.load(names, dtype=lambda name, info: None if name[: -len(".weight")] in kept else dtype,
                      device=device)
    assign_state_dict(model, state, path)
    # Buffers that checkpoints do not hold (transformers builds them in __init__, here they were on meta).
    model.embed_tokens.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)
    model.rotary_emb = Gemma3RotaryEmbedding(config=config)
    check_materialised(model)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_gemma_tokenizer(folder: str | os.PathLike) -> "PreTrainedTokenizerBase":
    """Open a Gemma 3 tokenizer folder (``tokenizer.json``, as in the Hugging Face Gemma 3 folders) set up as LTX-2
    uses it: left padding, pad token ``<pad>`` (or EOS when the tokenizer has none, as officially), BOS added.

    Raises:
        CheckpointError: no tokenizer files, or not a Gemma tokenizer (no ``<start_of_turn>``, or it does not add
            ``<bos>``).
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no Gemma 3 tokenizer here (expected tokenizer.json, e.g. from the "
                              "google/gemma-3-12b-it-qat-q4_0-unquantized folder).")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise CheckpointError(f"{folder}: the tokenizer cannot be opened ({e}); use a folder with Gemma 3's "
                              "tokenizer.json.") from e
    if tok.convert_tokens_to_ids("<start_of_turn>") in (None, tok.unk_token_id):
        raise CheckpointError(f"{folder}: the tokenizer has no <start_of_turn> token; it is not a Gemma 3 tokenizer.")
    tok.padding_side = "left"
    tok.truncation_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ids = tok("a")["input_ids"]
    if tok.bos_token_id is None or ids[0] != tok.bos_token_id:
        raise CheckpointError(f"{folder}: the tokenizer does not add <bos>; LTX-2 encodes prompts with a leading "
                              "<bos> (use the tokenizer of google/gemma-3-12b-it).")
    return tok


def tokenize_prompts(tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[str],
                     max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as LTX-2 feeds Gemma (official ``LTXVGemmaTokenizer.tokenize_with_weights``).

    Args:
        tokenizer: from :func:`load_gemma_tokenizer`.
        prompts: B strings; each is stripped of surrounding whitespace.
        max_length: tokens per prompt (1024).
    Returns:
        ``(input_ids, mask)``: long ``[B, max_length]`` (``<bos>`` + tokens, no EOS, left-padded with the pad id,
        cut to the first ``max_length`` tokens) and bool ``[B, max_length]`` (True = real token).
    Raises:
        ValueError: ``prompts`` is not a non-empty list of strings.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings, e.g. ['a cat walks'].")
    enc = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=max_length, truncation=True,
                    padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


# ----------------------------------------------------------------------------------------------------------------
# Feature extractor V1


def normalize_hidden_states(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor, *,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Feature extractor V1: per-sample, per-hidden-state masked normalisation, flattened (module docstring, step 3).

    Args:
        hidden_states: N+1 tensors ``[B, T, D]`` (embedding output and every layer), any float dtype.
        mask: bool ``[B, T]``, True = real token; every sample needs at least one.
        dtype: dtype of the result (statistics are computed in float32).
    Returns:
        ``[B, T, D·(N+1)]`` in ``dtype``, hidden-state index fastest (``[..., d·(N+1) + l]``), zero where
        ``mask`` is False.
    Raises:
        ValueError: shapes do not fit.
    """
    if not hidden_states:
        raise ValueError("normalize_hidden_states needs at least one hidden state.")
    B, T, D = hidden_states[0].shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be bool [B, T] = [{B}, {T}], got {mask.dtype} {list(mask.shape)}")
    valid = mask.to(hidden_states[0].device)[:, :, None]
    count = valid.sum(dim=(1, 2)).float() * D + FEATURE_EPS
    out = torch.empty(B, T, D, len(hidden_states), dtype=dtype, device=hidden_states[0].device)
    for i, h in enumerate(hidden_states):
        if tuple(h.shape) != (B, T, D):
            raise ValueError(f"hidden state {i} has shape {list(h.shape)}, expected {[B, T, D]}")
        x = h.float()
        mean = x.masked_fill(~valid, 0.0).sum(dim=(1, 2)) / count
        low = x.masked_fill(~valid, float("inf")).amin(dim=(1, 2))
        high = x.masked_fill(~valid, float("-inf")).amax(dim=(1, 2))
        normed = FEATURE_SCALE * (x - mean[:, None, None]) / (high - low + FEATURE_EPS)[:, None, None]
        out[..., i] = normed.masked_fill(~valid, 0.0)
    return out.reshape(B, T, D * len(hidden_states))


def gemma_hidden_states(gemma: "Gemma3TextModel", input_ids: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of Gemma for a left-padded batch: N+1 tensors ``[B, T, D]`` in the model dtype (embedding
    output, then every layer; the last after the final norm). ``input_ids`` long ``[B, T]``, ``mask`` bool
    ``[B, T]``, both moved to the model's device."""
    device = gemma.get_input_embeddings().weight.device
    out = gemma(input_ids=input_ids.to(device), attention_mask=mask.to(device).long(), output_hidden_states=True,
                use_cache=False)
    return tuple(out.hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# The encoder handle


class LTX2TextEncoder:
    """Gemma 3 text model + tokenizer + :class:`~cinetune.ltx2.connectors.LTX2TextProjection`.

    Args:
        gemma: ``Gemma3TextModel`` (:func:`load_gemma_text_model`).
        tokenizer: from :func:`load_gemma_tokenizer`.
        projection: ``aggregate_embed`` and both connectors, from the same checkpoint as the DiT.
        max_length: tokens per prompt (1024).
    Raises:
        ValueError: tokenizer, Gemma and projection do not fit together (vocabulary, feature width).
    """

    def __init__(self, gemma: "Gemma3TextModel", tokenizer: "PreTrainedTokenizerBase",
                 projection: LTX2TextProjection, max_length: int = MAX_LENGTH) -> None:
        self.gemma = gemma
        self.tokenizer = tokenizer
        self.projection = projection
        self.max_length = max_length
        vocab = gemma.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(f"The Gemma tokenizer has {len(tokenizer)} tokens but the model only {vocab}: tokenizer "
                             "and model do not belong together.")
        states = gemma.config.hidden_size * (gemma.config.num_hidden_layers + 1)
        if states != projection.config.feature_dim:
            raise ValueError(f"Gemma gives {gemma.config.num_hidden_layers + 1} hidden states of "
                             f"{gemma.config.hidden_size} ({states} features per token), but the checkpoint's "
                             f"aggregate_embed takes {projection.config.feature_dim}; LTX-2 needs {EXPECTED_GEMMA}.")

    @property
    def device(self) -> torch.device:
        """Device of the Gemma model (where :func:`encode_prompts` runs)."""
        return self.gemma.get_input_embeddings().weight.device

    def to(self, device: str | torch.device) -> "LTX2TextEncoder":
        """Move Gemma and the projection to ``device``; returns self."""
        self.gemma.to(device)
        self.projection.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → DiT contexts.

        Args:
            prompts: one prompt or a list of B prompts.
        Returns:
            ``(video_context, audio_context)``, each ``[B, 1024, 3840]`` float32 on the projection's device (before
            the DiT's caption projections).
        """
        return self.projection.connect(*encode_prompts(self, [prompts] if isinstance(prompts, str) else prompts))


@torch.no_grad()
def encode_prompts(encoder: LTX2TextEncoder, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts → projected Gemma features, the input of the connectors and the content of training caches.

    Steps 1–4 of the module docstring: tokenize, Gemma hidden states, feature extractor V1, ``aggregate_embed``.

    Args:
        encoder: the :class:`LTX2TextEncoder`.
        prompts: B prompt strings.
    Returns:
        ``(features, mask)``: float32 ``[B, 1024, 3840]`` and bool ``[B, 1024]`` (True = real token; padding is on
        the left), on the projection's device.
    Raises:
        ValueError: ``prompts`` is not a non-empty list of strings.
    """
    ids, mask = tokenize_prompts(encoder.tokenizer, prompts, encoder.max_length)
    states = gemma_hidden_states(encoder.gemma, ids, mask)
    proj_device = encoder.projection.text_embedding_projection.aggregate_embed.weight.device
    normed = normalize_hidden_states([h.to(proj_device) for h in states], mask.to(proj_device),
                                     dtype=encoder.projection.dtype)
    return encoder.projection.aggregate(normed), mask.to(proj_device)


def load_text_projection(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.bfloat16,
                         device: str | torch.device = "cpu") -> LTX2TextProjection:
    """Load ``aggregate_embed`` and both connectors from a combined LTX-2 checkpoint, or from a file holding only
    those 59 tensors under the same keys (e.g. a split connector file).

    Args:
        path: ``.safetensors`` with ``text_embedding_projection.*`` and
            ``model.diffusion_model.{video,audio}_embeddings_connector.*``; its metadata ``config`` JSON's
            ``transformer`` section configures the connectors when present (else 19B defaults + shapes).
        dtype: parameter dtype (None keeps stored dtypes; float8 tensors are dequantised to bf16).
        device: where the module ends up.
    Returns:
        :class:`~cinetune.ltx2.connectors.LTX2TextProjection` in eval mode, without gradients.
    Raises:
        CheckpointError: unreadable file, missing or misshaped tensors (named), unsupported connector options.
    """
    ckpt = open_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    for ours, theirs in FILE_PREFIXES.items():
        part = ckpt.select(theirs)
        names = list(part.model_infos())
        loaded = part.load(names, dtype=lambda name, info: dtype or (torch.bfloat16 if is_fp8_code(info.dtype)
                                                                      else None), device=device)
        tensors.update({ours + k: v for k, v in loaded.items()})
    if not tensors:
        what = describe_checkpoint({n: i.shape for n, i in ckpt.infos.items()})
        raise CheckpointError(f"{path}: this looks like {what}; it holds no LTX-2 text projection "
                              "(text_embedding_projection.*, model.diffusion_model.*_embeddings_connector.*). Use the "
                              "LTX-2 checkpoint the DiT comes from.")
    transformer = dict((ckpt.config() or {}).get("transformer") or {})
    config = text_projection_config(transformer, {k: tuple(v.shape) for k, v in tensors.items()})
    with torch.device("meta"):
        model = LTX2TextProjection(config)
    assign_state_dict(model, tensors, path)
    check_materialised(model)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Tiny Gemma 3 for tests and the embedded default model

#: Hidden size and layer count of the tiny Gemma 3. As in the 19B model (3840), the hidden size equals the connector
#: width of the tiny LTX-2 metadata (``caption_channels``).
TINY_GEMMA_HIDDEN: int = tiny_transformer_metadata()["caption_channels"]
TINY_GEMMA_LAYERS = 6
#: ``aggregate_embed`` input width that the tiny Gemma gives (hidden size × 7 hidden states).
TINY_FEATURE_DIM = TINY_GEMMA_HIDDEN * (TINY_GEMMA_LAYERS + 1)


def tiny_gemma_text_config(vocab_size: int) -> dict:
    """Text config of the tiny Gemma 3: the 12B's values (:data:`GEMMA3_12B_TEXT_CONFIG`) with sizes shrunk —
    hidden :data:`TINY_GEMMA_HIDDEN`, 6 layers (5 sliding-window + 1 global, the 12B's pattern), 4 query heads and
    2 key/value heads of 16 (like the 12B, heads × head_dim differs from the hidden size), MLP 2 × hidden,
    ``query_pre_attn_scalar`` = head_dim as :func:`gemma_text_config_from_shapes` derives it."""
    return {**GEMMA3_12B_TEXT_CONFIG, "vocab_size": vocab_size, "hidden_size": TINY_GEMMA_HIDDEN,
            "intermediate_size": 2 * TINY_GEMMA_HIDDEN, "num_hidden_layers": TINY_GEMMA_LAYERS,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16}


def _tiny_gemma_folder_config(vocab_size: int) -> dict:
    """``config.json`` of the tiny folder, in the layout of google/gemma-3-12b-it-qat-q4_0-unquantized (a
    ``gemma3`` config with a text and a SigLIP vision config; the vision tower is tiny too)."""
    text = {k: v for k, v in tiny_gemma_text_config(vocab_size).items()
            if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
        "eos_token_id": [1, 106], "initializer_range": 0.02, "mm_tokens_per_image": 4, "torch_dtype": "bfloat16",
        "text_config": {"model_type": "gemma3_text", **text},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                          "vision_use_head": False, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    }


def _published_gemma_name(name: str) -> str:
    """transformers' in-memory ``Gemma3ForConditionalGeneration`` names → the names in the published checkpoints."""
    for ours, theirs in (("model.language_model.", "language_model.model."),
                         ("model.vision_tower.", "vision_tower.vision_model."),
                         ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def write_tiny_gemma(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Gemma 3 (:func:`tiny_gemma_text_config`, the real tokenizer's vocabulary) and return
    its path.

    - ``path`` ending in ``.safetensors``: a ComfyUI-style single file (``model.embed_tokens.weight``,
      ``model.layers.N.*``, ``model.norm.weight``; bf16; no config and no tokenizer inside, like
      ``gemma_3_12B_it.safetensors``), written atomically.
    - otherwise: a Hugging Face folder laid out like google/gemma-3-12b-it-qat-q4_0-unquantized (``config.json``
      of ``Gemma3ForConditionalGeneration``, two bf16 shards with ``language_model.model.*``,
      ``vision_tower.vision_model.*``, ``multi_modal_projector.*`` and ``model.safetensors.index.json``; tied
      embeddings, no ``lm_head``) plus the tokenizer files; replaced atomically.

    Weights: ``cinetune.core.tiny.seeded_tensor`` (depends only on ``seed`` and the tensor name).

    Raises:
        FileNotFoundError: ``tokenizer_dir`` has no tokenizer files.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from ..core.tiny import seeded_tensor, tokenizer_vocab_size, write_hf_folder

    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    config = _tiny_gemma_folder_config(tokenizer_vocab_size(tokenizer_dir))
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(Gemma3Config(**config))
    shapes = {_published_gemma_name(k): tuple(v.shape) for k, v in model.state_dict().items()
              if not k.startswith("lm_head.")}
    tensors = {k: seeded_tensor(seed, k, s, torch.bfloat16) for k, s in sorted(shapes.items())}
    if path.suffix == ".safetensors":
        text = {"model." + k[len("language_model.model."):]: v for k, v in tensors.items()
                if k.startswith("language_model.model.")}
        return save_file_atomic(text, path, metadata={"format": "pt"})

    return write_hf_folder(path, config, tensors, "language_model.model.embed_tokens.weight", tokenizer_dir)
