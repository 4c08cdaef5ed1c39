"""LTX-2 text projection: ``aggregate_embed`` and the two embeddings connectors (video, audio) with learnable
registers.

Pipeline on the text side of the 19B model (ltx2.md §3; Lightricks/LTX-2 at 2026-02-09,
``packages/ltx-core/src/ltx_core/text_encoders/gemma/``):

1. Gemma 3 hidden states, normalised and flattened (``ltx2.text.normalize_hidden_states``): ``[B, T, D·(N+1)]``.
2. ``text_embedding_projection.aggregate_embed``: Linear(D·(N+1) → C, no bias) (``feature_extractor.py``)
   → features ``[B, T, C]`` (C = 3840 = ``caption_channels``). Training caches store these features and the mask.
3. Two ``Embeddings1DConnector`` with the same architecture and their own weights (``embeddings_connector.py``,
   ``encoders/av_encoder.py``), both fed the same features → video context and audio context ``[B, T, C]``; the DiT
   projects them with its own ``caption_projection`` / ``audio_caption_projection``.

Connector (per modality): valid tokens are moved to the front in their order and every later position ``i`` gets
``learnable_registers[i % R]`` (the official code tiles the R registers over the sequence), after which no token is
masked; then ``num_layers`` pre-norm blocks ``h += attn1(rms(h))``, ``h += ff(rms(h))`` with parameter-free RMSNorm
(eps 1e-6), attention with learnable RMSNorm on q and k over all heads together, split RoPE over positions
``0 … T−1`` (no middle grid) with ``max_pos`` 4096 (:mod:`cinetune.ltx2.rope`), and GELU(tanh) feed-forward;
finally a parameter-free RMSNorm.
The video context is multiplied by the connector's output mask (all ones with registers, so a no-op, as in
``av_encoder.py``); the audio context is not.

State dict of :class:`LTX2TextProjection` and the official checkpoint keys (:func:`official_key`):

==========================================  =================================================================
module key                                  key in the combined LTX-2 checkpoint
==========================================  =================================================================
``text_embedding_projection.*``             ``text_embedding_projection.*`` (top level)
``video_embeddings_connector.*``            ``model.diffusion_model.video_embeddings_connector.*``
``audio_embeddings_connector.*``            ``model.diffusion_model.audio_embeddings_connector.*``
==========================================  =================================================================

Each connector holds 29 tensors in the 19B file: ``learnable_registers`` and, per block ``transformer_1d_blocks.N``,
``attn1.{to_q,to_k,to_v,to_out.0}.{weight,bias}``, ``attn1.{q_norm,k_norm}.weight``, ``ff.net.0.proj.{weight,bias}``,
``ff.net.2.{weight,bias}`` (ltx2_state_dict_shapes.txt).

Configuration: read from the checkpoint's metadata ``config["transformer"]`` (the ``connector_*`` fields,
``caption_channels``, ``rope_type``, ``frequencies_precision``) through
:class:`cinetune.ltx2.config.LTX2TransformerConfig`, which gives the 19B values only to missing keys; every size a
tensor shows (layers, registers, feed-forward width, projection input) is taken from the shapes when they are given
(:func:`text_projection_config`).

Decisions: the official builder ignores ``connector_norm_output`` and always applies the final norm; here the field
is honoured (true in the 19B metadata, so the result is the same). RoPE theta is 10000 (the official connector's
default; the metadata has no connector theta). ``rope_type`` "split" is the 19B value; "interleaved" (the official
code's default) is accepted too. Gated attention (LTX-2.3 connectors) is refused with a message.
The attention and feed-forward modules are the DiT's (:mod:`cinetune.ltx2.dit`; same keys and numerics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpoint import CheckpointError
from ..core.quant import CastLinear
from .config import LTX2TransformerConfig, tiny_transformer_metadata
from .dit import Attention, FeedForward
from .rope import connector_positions, rope_frequencies

#: RMSNorm epsilon of every connector norm (official ``rms_norm`` default and ``torch.nn.RMSNorm(eps=1e-6)``).
NORM_EPS = 1e-6
#: RoPE theta of the connectors (official ``Embeddings1DConnector`` default; not in the metadata).
ROPE_THETA = 10000.0

#: Combined-checkpoint prefix of each top-level submodule of :class:`LTX2TextProjection`.
FILE_PREFIXES: dict[str, str] = {
    "text_embedding_projection.": "text_embedding_projection.",
    "video_embeddings_connector.": "model.diffusion_model.video_embeddings_connector.",
    "audio_embeddings_connector.": "model.diffusion_model.audio_embeddings_connector.",
}

#: Input width of ``aggregate_embed`` for Gemma 3 12B: hidden size 3840 × 49 hidden states.
DEFAULT_FEATURE_DIM = 3840 * 49


def official_key(key: str) -> str:
    """Map a :class:`LTX2TextProjection` state-dict key to its key in the combined LTX-2 checkpoint.

    Raises:
        KeyError: the key belongs to no submodule of the projection.
    """
    for ours, theirs in FILE_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(f"{key} is not a text-projection key")


def module_key(file_key: str) -> str | None:
    """Map a combined-checkpoint key to a :class:`LTX2TextProjection` key; None for keys of other components."""
    for ours, theirs in FILE_PREFIXES.items():
        if file_key.startswith(theirs):
            return ours + file_key[len(theirs):]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TextProjectionConfig:
    """Sizes and options of :class:`LTX2TextProjection`.

    Attributes:
        feature_dim: input width of ``aggregate_embed`` (Gemma hidden size × number of hidden states; 188160).
        dim: connector width C = heads × head_dim = ``caption_channels`` (3840).
        heads, head_dim: connector attention heads (30 × 128).
        num_layers: blocks per connector (2).
        ff_dim: feed-forward hidden width (4·C = 15360).
        num_registers: learnable registers per connector (128); 0 = no registers (padding stays masked).
        max_pos: RoPE ``max_pos`` of the token positions (4096).
        theta: RoPE theta (10000).
        norm_output: final parameter-free RMSNorm (true).
        double_precision_rope: frequency grid computed in float64 (``frequencies_precision == "float64"``).
        split_rope: split RoPE layout (``rope_type == "split"``, 19B); False = interleaved.
    """

    feature_dim: int = DEFAULT_FEATURE_DIM
    dim: int = 3840
    heads: int = 30
    head_dim: int = 128
    num_layers: int = 2
    ff_dim: int = 4 * 3840
    num_registers: int = 128
    max_pos: int = 4096
    theta: float = ROPE_THETA
    norm_output: bool = True
    double_precision_rope: bool = True
    split_rope: bool = True

    def __post_init__(self) -> None:
        for name in ("feature_dim", "dim", "heads", "head_dim", "num_layers", "ff_dim", "max_pos"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"text projection config: {name} must be a positive int, got {value!r}")
        if isinstance(self.num_registers, bool) or not isinstance(self.num_registers, int) or self.num_registers < 0:
            raise ValueError(f"text projection config: num_registers must be an int ≥ 0, got {self.num_registers!r}")
        if self.heads * self.head_dim != self.dim:
            raise ValueError(f"text projection config: heads × head_dim = {self.heads} × {self.head_dim} must equal "
                             f"the connector width {self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"text projection config: head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.ff_dim % self.dim:
            raise ValueError(f"text projection config: ff_dim {self.ff_dim} must be a multiple of the width "
                             f"{self.dim} (the feed-forward widens by an integer factor, 4 in LTX-2)")


def _block_count(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def text_projection_config(transformer: Mapping | LTX2TransformerConfig | None = None,
                           shapes: Mapping[str, Sequence[int]] | None = None, *,
                           feature_dim: int | None = None) -> TextProjectionConfig:
    """Build a :class:`TextProjectionConfig` from the checkpoint's transformer config and tensor shapes.

    Args:
        transformer: the metadata ``config["transformer"]`` dict (parsed by
            :meth:`cinetune.ltx2.config.LTX2TransformerConfig.from_metadata`, which gives the 19B values to absent
            keys) or an already parsed :class:`~cinetune.ltx2.config.LTX2TransformerConfig`; None = 19B values.
            Read: ``caption_channels``, ``connector_*``, ``rope_type``, ``frequencies_precision``.
        shapes: optional :class:`LTX2TextProjection` key (or combined-checkpoint key) → shape; when given, the
            feature width, layer count, feed-forward width and register count come from them, and the width must
            agree with the metadata.
        feature_dim: ``aggregate_embed`` input width when no shapes are given (default 3840 × 49).
    Returns:
        The config.
    Raises:
        CheckpointError: metadata of a newer LTX release (gated connector attention, …) or otherwise invalid,
            shapes that disagree with the metadata or with each other, or missing connector tensors.
    """
    if not isinstance(transformer, LTX2TransformerConfig):
        transformer = LTX2TransformerConfig.from_metadata(transformer or {})
    t = transformer
    dim, head_dim = t.caption_channels, t.connector_attention_head_dim
    values = dict(dim=dim, heads=t.connector_num_attention_heads, head_dim=head_dim,
                  num_layers=t.connector_num_layers, ff_dim=4 * dim, num_registers=t.connector_num_learnable_registers,
                  feature_dim=feature_dim or DEFAULT_FEATURE_DIM)
    if shapes is not None:
        values = _sizes_from_shapes(shapes, values)
    try:
        return TextProjectionConfig(max_pos=t.connector_positional_embedding_max_pos[0], theta=ROPE_THETA,
                                    norm_output=t.connector_norm_output, double_precision_rope=t.double_precision_rope,
                                    split_rope=t.rope_type == "split", **values)
    except ValueError as e:
        raise CheckpointError(f"The LTX-2 text connectors cannot be built from this checkpoint: {e}.") from e


def _sizes_from_shapes(shapes: Mapping[str, Sequence[int]], meta: dict) -> dict:
    """``meta`` (sizes from the metadata) with every size the tensors show taken from them, checked against it."""
    shapes = {module_key(k) or k: tuple(v) for k, v in shapes.items()}
    agg = shapes.get("text_embedding_projection.aggregate_embed.weight")
    if agg is None:
        raise CheckpointError("text_embedding_projection.aggregate_embed.weight is missing: the file has no LTX-2 "
                              "text projection (use the LTX-2 checkpoint the DiT comes from).")
    dim, feature_dim = agg
    per_connector = []
    for name in ("video_embeddings_connector", "audio_embeddings_connector"):
        q = shapes.get(f"{name}.transformer_1d_blocks.0.attn1.to_q.weight")
        ff = shapes.get(f"{name}.transformer_1d_blocks.0.ff.net.0.proj.weight")
        if q is None or ff is None:
            raise CheckpointError(f"{name} tensors are missing (expected model.diffusion_model.{name}.* in the "
                                  "LTX-2 checkpoint).")
        # Without the tensor the metadata's count stays, so loading names the missing learnable_registers.
        registers = shapes.get(f"{name}.learnable_registers", (meta["num_registers"],))[0]
        per_connector.append((q[0], ff[0], _block_count(shapes, f"{name}.transformer_1d_blocks."), registers))
    if per_connector[0] != per_connector[1]:
        raise CheckpointError(f"The video and audio text connectors differ in size ({per_connector[0]} vs "
                              f"{per_connector[1]}); LTX-2 19B connectors share one architecture.")
    width, ff_dim, layers, registers = per_connector[0]
    if width != dim:
        raise CheckpointError(f"The connectors are {width} wide but aggregate_embed gives {dim} features.")
    head_dim = meta["head_dim"]
    if dim != meta["dim"] or dim != meta["heads"] * head_dim:
        raise CheckpointError(
            f"The metadata says caption_channels {meta['dim']} with {meta['heads']} heads × {head_dim}, but the "
            f"connector tensors are {dim} wide; the metadata does not belong to these tensors.")
    return {**meta, "feature_dim": feature_dim, "num_layers": layers, "ff_dim": ff_dim, "num_registers": registers}


def tiny_config() -> dict:
    """The metadata-style ``config["transformer"]`` of the tiny LTX-2 model
    (:func:`cinetune.ltx2.config.tiny_transformer_metadata`), whose ``caption_channels`` and ``connector_*`` fields
    configure a tiny text projection (tests, the embedded tiny model). The ``aggregate_embed`` input width comes
    from the tiny Gemma (``cinetune.ltx2.text.TINY_FEATURE_DIM``)."""
    return tiny_transformer_metadata()


# ----------------------------------------------------------------------------------------------------------------
# Modules


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), None, NORM_EPS)


class ConnectorBlock(nn.Module):
    """Pre-norm block: ``h += attn1(rms(h))``; ``h += ff(rms(h))`` (official ``_BasicTransformerBlock1D``).

    ``attn1`` is the DiT's attention module (biased ``to_q/to_k/to_v/to_out.0``, learnable RMSNorm on q and k over
    the full width, RoPE on q and k, scale ``1/sqrt(head_dim)``); ``ff`` the DiT's GELU(tanh) feed-forward
    (``net.0.proj``, ``net.2``).
    """

    def __init__(self, config: TextProjectionConfig) -> None:
        super().__init__()
        self.attn1 = Attention(config.dim, None, config.heads, config.head_dim, NORM_EPS)
        self.ff = FeedForward(config.dim, mult=config.ff_dim // config.dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], *,
                key_mask: torch.Tensor | None = None, backend: str = "sdpa") -> torch.Tensor:
        """``x [B, L, C]``; ``rope`` = (cos, sin) of :func:`cinetune.ltx2.rope.rope_frequencies`; ``key_mask`` bool
        ``[B, L]`` (True = attended) or None. Returns ``[B, L, C]``."""
        x = x + self.attn1(_rms_norm(x), rope=rope, key_mask=key_mask, backend=backend)
        return x + self.ff(_rms_norm(x))


def replace_padding_with_registers(x: torch.Tensor, mask: torch.Tensor, registers: torch.Tensor) -> torch.Tensor:
    """Move the valid tokens of each sample to the front (keeping their order) and fill every later position ``i``
    with ``registers[i % R]``.

    Source: Lightricks/LTX-2 ``embeddings_connector.py`` ``_replace_padded_with_learnable_registers`` (registers tiled
    over the sequence; with left padding the valid tokens end up in front).

    Args:
        x: ``[B, L, C]``. mask: bool ``[B, L]``, True = valid token. registers: ``[R, C]``.
    Returns:
        ``[B, L, C]`` in ``x.dtype``.
    """
    B, L, C = x.shape
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    front = torch.gather(x, 1, order[..., None].expand(B, L, C))
    positions = torch.arange(L, device=x.device)
    tail = registers.to(x.dtype)[positions % registers.shape[0]]
    keep = positions[None, :] < mask.sum(dim=1, keepdim=True)
    return torch.where(keep[..., None], front, tail[None])


class Embeddings1DConnector(nn.Module):
    """One text connector (see the module docstring). Keys: ``transformer_1d_blocks.N.*``, ``learnable_registers``.

    ``forward(x, mask)``: ``x [B, L, C]`` features, ``mask`` bool ``[B, L]`` (True = valid token) →
    ``(out [B, L, C], out_mask bool [B, L])``; ``out_mask`` is all True when registers fill the padding, else
    ``mask``.
    """

    def __init__(self, config: TextProjectionConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer_1d_blocks = nn.ModuleList([ConnectorBlock(config) for _ in range(config.num_layers)])
        if config.num_registers:
            # Official initialisation: uniform in [-1, 1).
            self.learnable_registers = nn.Parameter(torch.rand(config.num_registers, config.dim) * 2 - 1)
        else:
            self.register_parameter("learnable_registers", None)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: the dtype of the q norm weight (never stored in fp8)."""
        return self.transformer_1d_blocks[0].attn1.q_norm.weight.dtype

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *,
                backend: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
        key_mask: torch.Tensor | None = mask
        if self.learnable_registers is not None:
            x = replace_padding_with_registers(x, mask, self.learnable_registers)
            key_mask = None
            mask = torch.ones_like(mask)
        c = self.config
        rope = rope_frequencies(connector_positions(x.shape[1], x.device), c.dim, c.heads, [c.max_pos], c.theta,
                                split=c.split_rope, double_precision=c.double_precision_rope, use_middle=False)
        for block in self.transformer_1d_blocks:
            x = block(x, rope, key_mask=key_mask, backend=backend)
        if self.config.norm_output:
            x = _rms_norm(x)
        return x, mask


class _AggregateEmbed(nn.Module):
    """Holds ``aggregate_embed`` so its key is ``text_embedding_projection.aggregate_embed.weight``."""

    def __init__(self, feature_dim: int, dim: int) -> None:
        super().__init__()
        self.aggregate_embed = CastLinear(feature_dim, dim, bias=False)


class LTX2TextProjection(nn.Module):
    """``aggregate_embed`` plus the video and audio embeddings connectors of LTX-2 (keys and sources in the module
    docstring).

    Args:
        config: a :class:`TextProjectionConfig` (see :func:`text_projection_config`).
    Attributes:
        attention_backend: backend name for ``cinetune.core.attention.attention`` (default ``"sdpa"``).
    """

    def __init__(self, config: TextProjectionConfig) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = "sdpa"
        self.text_embedding_projection = _AggregateEmbed(config.feature_dim, config.dim)
        self.video_embeddings_connector = Embeddings1DConnector(config)
        self.audio_embeddings_connector = Embeddings1DConnector(config)

    @classmethod
    def from_metadata(cls, transformer: Mapping | LTX2TransformerConfig | None = None,
                      shapes: Mapping[str, Sequence[int]] | None = None, *,
                      feature_dim: int | None = None) -> "LTX2TextProjection":
        """Random-initialised projection built by :func:`text_projection_config` (same arguments)."""
        return cls(text_projection_config(transformer, shapes, feature_dim=feature_dim))

    @property
    def dtype(self) -> torch.dtype:
        """Stored dtype of ``aggregate_embed`` (the compute dtype of :meth:`aggregate`)."""
        return self.text_embedding_projection.aggregate_embed.weight.dtype

    def aggregate(self, normed: torch.Tensor) -> torch.Tensor:
        """``aggregate_embed``: normalised hidden states ``[B, T, feature_dim]`` → features ``[B, T, dim]``.

        Computed in the stored weight dtype (bf16 for the published file, as officially); returns float32.
        Raises:
            ValueError: the last dimension is not ``feature_dim`` (the Gemma model does not fit this checkpoint).
        """
        if normed.shape[-1] != self.config.feature_dim:
            raise ValueError(f"aggregate_embed takes {self.config.feature_dim} features per token, got "
                             f"{normed.shape[-1]}: the Gemma model (hidden size × hidden states) does not belong to "
                             "this LTX-2 checkpoint.")
        return self.text_embedding_projection.aggregate_embed(normed.to(self.dtype)).float()

    def connect(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run both connectors on the same features.

        Args:
            features: ``[B, T, dim]`` (any float dtype; computed in the connectors' weight dtype).
            mask: bool ``[B, T]``, True = valid token (from :func:`cinetune.ltx2.text.encode_prompts`).
        Returns:
            ``(video_context, audio_context)``, each ``[B, T, dim]`` float32. The video context is multiplied by the
            connector's output mask (all ones with registers), the audio context is not (official ``av_encoder.py``).
        Raises:
            ValueError: shapes do not fit.
        """
        if features.ndim != 3 or features.shape[-1] != self.config.dim:
            raise ValueError(f"features must be [B, T, {self.config.dim}], got {list(features.shape)}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(features.shape[:2]):
            raise ValueError(f"mask must be bool [B, T] = {list(features.shape[:2])}, got {mask.dtype} "
                             f"{list(mask.shape)}")
        x = features.to(self.video_embeddings_connector.dtype)
        video, video_mask = self.video_embeddings_connector(x, mask, backend=self.attention_backend)
        audio, _ = self.audio_embeddings_connector(x, mask, backend=self.attention_backend)
        return (video * video_mask[..., None]).float(), audio.float()

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the combined-checkpoint keys (:func:`official_key`)."""
        return {official_key(k): v for k, v in self.state_dict().items()}
