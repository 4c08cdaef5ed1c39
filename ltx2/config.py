"""LTX-2 19B DiT configuration and the family's constants (LoRA targets, the fp8 keep rule).

File detection (:mod:`cinetune.ltx2.config_detect`), the official ↔ diffusers key names
(:mod:`cinetune.ltx2.config_keys`) and the released checkpoint variants (:mod:`cinetune.ltx2.config_variants`) live
beside this module; their names are importable from here too.

Sources: the official checkpoint's embedded metadata ``config.transformer`` (a third-party verbatim dump of
``ltx-2-19b-dev.safetensors``); Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/model/transformer/
model_configurator.py`` (which keys are read, their code defaults and the ``check_config_value`` guards),
``quantization/fp8_scaled_mm.py`` (fp8 exclusions) and ``packages/ltx-trainer`` (LoRA targets); huggingface/diffusers
``LTX2VideoTransformer3DModel`` (its ``config.json`` names).

Decisions:

- **Defaults are the 19B checkpoint's values**, used only for keys the metadata lacks. They differ from the
  official code defaults in three places that matter (``rope_type`` "interleaved" → "split",
  ``av_ca_timestep_scale_multiplier`` 1 → 1000, ``frequencies_precision`` unset → "float64"): a file whose metadata
  was stripped is a 19B file, and the code defaults would make it produce noise. Keys that are present always win.
- **fp8 keep rule**: exactly the official block list (block 0 and blocks 43–47 stay high precision), by block index,
  whatever the block count. It is not rescaled to "first block and last five" for other depths: the official list is
  a fixed list tuned on the 48-block model, and no other depth has been released.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..core.checkpoint import CheckpointError
from .config_detect import (BLOCK_LIST, CONNECTOR_PREFIXES, DIT_PREFIX, EXPECTED_FILE, MARKER_KEY, UNSUPPORTED_23,
                            NotLTX2CheckpointError, UnsupportedLTX2Error, _not_ltx2_message, _refuse_newer_settings,
                            _shapes, check_supported, count_blocks, dit_shapes, parse_model_version)
from .config_keys import (diffusers_to_official, diffusers_to_official_key, official_to_diffusers,
                          official_to_diffusers_key)
from .config_variants import (DEV_AUDIO_GUIDANCE, DEV_VIDEO_GUIDANCE, DISTILLED_SIGMAS, GUIDANCE_FREE,
                              STAGE2_DISTILLED_SIGMAS, VARIANTS, LTX2Guidance, LTX2Variant, detect_variant,
                              file_has_fp8)
from .rope import AUDIO_HOP_LENGTH, AUDIO_LATENT_DOWNSAMPLE, AUDIO_SAMPLE_RATE, CAUSAL_OFFSET, VIDEO_SCALE_FACTORS

__all__ = [
    "LTX2_BLOCK_PREFIXES", "LTX2_LORA_TARGETS", "LTX2TransformerConfig", "LTX2_19B", "tiny_transformer_metadata",
    "FP8_HIGH_PRECISION_BLOCKS", "ltx2_fp8_keep_high_precision",
    # file detection (config_detect.py)
    "BLOCK_LIST", "CONNECTOR_PREFIXES", "DIT_PREFIX", "EXPECTED_FILE", "MARKER_KEY", "UNSUPPORTED_23",
    "NotLTX2CheckpointError", "UnsupportedLTX2Error", "check_supported", "count_blocks", "dit_shapes",
    "parse_model_version",
    # key names (config_keys.py)
    "diffusers_to_official", "diffusers_to_official_key", "official_to_diffusers", "official_to_diffusers_key",
    # released variants (config_variants.py)
    "DEV_AUDIO_GUIDANCE", "DEV_VIDEO_GUIDANCE", "DISTILLED_SIGMAS", "GUIDANCE_FREE", "STAGE2_DISTILLED_SIGMAS",
    "VARIANTS", "LTX2Guidance", "LTX2Variant", "detect_variant", "file_has_fp8",
]

#: Module-name prefixes under which LoRA targets live.
LTX2_BLOCK_PREFIXES: tuple[str, ...] = (BLOCK_LIST + ".",)
#: Official ltx-trainer default LoRA targets (``LoraConfig.target_modules``, suffix match): every attention
#: projection of ``attn1``, ``attn2``, ``audio_attn1``, ``audio_attn2``, ``audio_to_video_attn`` and
#: ``video_to_audio_attn`` in every block (Lightricks/LTX-2 ``packages/ltx-trainer/src/ltx_trainer/config.py``).
LTX2_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


# ---------------------------------------------------------------------------------------------------------------
# Transformer config


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"LTX2TransformerConfig.{name} must be a positive int, got {v!r}")


def _positive_number(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"LTX2TransformerConfig.{name} must be a positive number, got {v!r}")


@dataclass(frozen=True)
class LTX2TransformerConfig:
    """Dimensions and numerics of the LTX-2 audio+video DiT (``config.transformer`` of the checkpoint metadata).

    Defaults are the values of the released 19B checkpoint (§1.3 of the reference notes). The video stream has
    ``inner_dim = num_attention_heads · attention_head_dim`` (4096), the audio stream
    ``audio_inner_dim = audio_num_attention_heads · audio_attention_head_dim`` (2048).

    Attributes:
        num_layers: dual-stream blocks (48).
        num_attention_heads, attention_head_dim: video attention (32 × 128).
        in_channels, out_channels: video token features (128 latent channels, patch size 1).
        cross_attention_dim: video text-context width after the caption projection (= inner_dim).
        caption_channels: width of the text connectors' output (3840), input of the caption projections.
        audio_num_attention_heads, audio_attention_head_dim: audio attention (32 × 64); also the heads of both
            audio↔video cross-attentions.
        audio_in_channels, audio_out_channels: audio token features (8 channels × 16 mel bins = 128).
        audio_cross_attention_dim: audio text-context width after projection (= audio_inner_dim); also the RoPE
            width of the audio↔video cross-attentions.
        norm_eps: epsilon of every RMSNorm / LayerNorm (1e-6).
        positional_embedding_theta: RoPE θ (10000).
        positional_embedding_max_pos: video RoPE normalisers (t seconds, y px, x px) = (20, 2048, 2048).
        audio_positional_embedding_max_pos: audio RoPE normaliser (t seconds) = (20,).
        timestep_scale_multiplier: DiT timestep = multiplier · σ (1000).
        av_ca_timestep_scale_multiplier: the audio↔video gate AdaLNs see
            ``timestep · av_ca_timestep_scale_multiplier / timestep_scale_multiplier`` (1000 → factor 1).
        rope_type: ``"split"`` (19B) or ``"interleaved"`` (official code default, legacy).
        frequencies_precision: ``"float64"`` (19B: the RoPE frequency grid is built in float64) or ``"float32"``.
        use_middle_indices_grid: RoPE uses the middle of each token's [start, end) bounds (True for 19B).
        causal_temporal_positioning: the video time positions use the causal first-frame fix (True).
        connector_*: the text connectors' settings (read by ``ltx2/text.py``): layers (2), heads (30) × head dim
            (128), learnable registers (128), RoPE normaliser ((4096,)), final RMSNorm (True).

    Raises:
        ValueError: a size is not a positive int, the widths do not fit together (named), the RoPE layout cannot
            be built (head counts must divide the rotary slots), or ``rope_type`` / ``frequencies_precision`` is
            unknown.
    """

    num_layers: int = 48
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    in_channels: int = 128
    out_channels: int = 128
    cross_attention_dim: int = 4096
    caption_channels: int = 3840
    audio_num_attention_heads: int = 32
    audio_attention_head_dim: int = 64
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    audio_cross_attention_dim: int = 2048
    norm_eps: float = 1e-6
    positional_embedding_theta: float = 10000.0
    positional_embedding_max_pos: tuple[int, ...] = (20, 2048, 2048)
    audio_positional_embedding_max_pos: tuple[int, ...] = (20,)
    timestep_scale_multiplier: float = 1000.0
    av_ca_timestep_scale_multiplier: float = 1000.0
    rope_type: str = "split"
    frequencies_precision: str = "float64"
    use_middle_indices_grid: bool = True
    causal_temporal_positioning: bool = True
    connector_num_layers: int = 2
    connector_num_attention_heads: int = 30
    connector_attention_head_dim: int = 128
    connector_num_learnable_registers: int = 128
    connector_positional_embedding_max_pos: tuple[int, ...] = (4096,)
    connector_norm_output: bool = True

    def __post_init__(self) -> None:
        for name in ("positional_embedding_max_pos", "audio_positional_embedding_max_pos",
                     "connector_positional_embedding_max_pos"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "cross_attention_dim", "caption_channels", "audio_num_attention_heads",
                     "audio_attention_head_dim", "audio_in_channels", "audio_out_channels",
                     "audio_cross_attention_dim", "connector_num_layers", "connector_num_attention_heads",
                     "connector_attention_head_dim"):
            _positive_int(name, getattr(self, name))
        if (isinstance(self.connector_num_learnable_registers, bool)
                or not isinstance(self.connector_num_learnable_registers, int)
                or self.connector_num_learnable_registers < 0):
            raise ValueError("LTX2TransformerConfig.connector_num_learnable_registers must be an int ≥ 0, got "
                             f"{self.connector_num_learnable_registers!r}")
        for name in ("norm_eps", "positional_embedding_theta", "timestep_scale_multiplier",
                     "av_ca_timestep_scale_multiplier"):
            _positive_number(name, getattr(self, name))
        for name, n in (("positional_embedding_max_pos", 3), ("audio_positional_embedding_max_pos", 1),
                        ("connector_positional_embedding_max_pos", 1)):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(f"LTX2TransformerConfig.{name} needs {n} entries, got {list(value)}")
            for i, v in enumerate(value):
                _positive_int(f"{name}[{i}]", v)
        if self.rope_type not in ("split", "interleaved"):
            raise ValueError(f"rope_type {self.rope_type!r} is not an LTX-2 RoPE layout; expected 'split' (LTX-2 "
                             "19B) or 'interleaved'")
        if self.frequencies_precision not in ("float32", "float64"):
            raise ValueError(f"frequencies_precision must be 'float32' or 'float64', got "
                             f"{self.frequencies_precision!r}")
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must equal the video width "
                             f"num_attention_heads·attention_head_dim = {self.inner_dim} (the caption projection "
                             "outputs the video width)")
        if self.audio_cross_attention_dim != self.audio_inner_dim:
            raise ValueError(f"audio_cross_attention_dim {self.audio_cross_attention_dim} must equal the audio width "
                             f"audio_num_attention_heads·audio_attention_head_dim = {self.audio_inner_dim}")
        self._check_rope("video self-attention", self.inner_dim, 3, self.num_attention_heads)
        self._check_rope("audio self-attention", self.audio_inner_dim, 1, self.audio_num_attention_heads)
        # The video side of the audio↔video RoPE is laid out over the video head count (official quirk).
        self._check_rope("audio↔video cross-attention", self.audio_cross_attention_dim, 1, self.num_attention_heads)
        self._check_rope("audio↔video cross-attention", self.audio_cross_attention_dim, 1,
                         self.audio_num_attention_heads)

    def _check_rope(self, what: str, dim: int, n_dims: int, heads: int) -> None:
        if dim % 2 or dim // (2 * n_dims) < 1:
            raise ValueError(f"{what}: width {dim} is too small or odd for a {n_dims}-axis RoPE")
        if self.rope_type == "split" and (dim // 2) % heads:
            raise ValueError(f"{what}: split RoPE needs width/2 = {dim // 2} rotary slots divisible by {heads} heads")

    @property
    def inner_dim(self) -> int:
        """Video width (4096)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def audio_inner_dim(self) -> int:
        """Audio width (2048)."""
        return self.audio_num_attention_heads * self.audio_attention_head_dim

    @property
    def double_precision_rope(self) -> bool:
        """True when the RoPE frequency grid is computed in float64 (``frequencies_precision == "float64"``)."""
        return self.frequencies_precision == "float64"

    @property
    def cross_modal_max_pos(self) -> int:
        """RoPE normaliser of the audio↔video cross-attentions: max of the video and audio time normalisers (20)."""
        return max(self.positional_embedding_max_pos[0], self.audio_positional_embedding_max_pos[0])

    @property
    def av_ca_factor(self) -> float:
        """Factor on the timestep fed to the audio↔video gate AdaLNs (1.0 for 19B)."""
        return self.av_ca_timestep_scale_multiplier / self.timestep_scale_multiplier

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> LTX2TransformerConfig:
        """Build the config from the checkpoint's ``config.transformer`` dict.

        Present keys always win; absent keys get the 19B values. Unknown keys (``_class_name``, ``attention_type``,
        …) are ignored. The keys the official configurator pins with ``check_config_value`` are checked when present.

        Args:
            metadata: ``json.loads(safe_open(f).metadata()["config"])["transformer"]``; a dict that holds a
                ``"transformer"`` dict (the whole ``config``) is accepted too.

        Returns:
            The config.

        Raises:
            CheckpointError: LTX-2.3 or newer settings (``apply_gated_attention``, ``cross_attention_adaln``,
                ``caption_proj_before_connector``, ``connector_apply_gated_attention`` true, ``ff_bias`` false, …);
                a pinned key with another value (another architecture); a value of the wrong type; sizes that do
                not fit together (the :class:`ValueError` text of the dataclass).
        """
        if not isinstance(metadata, Mapping):
            raise CheckpointError(f"LTX-2 transformer metadata must be a dict, got {type(metadata).__name__}")
        if isinstance(metadata.get("transformer"), Mapping):
            metadata = metadata["transformer"]
        _refuse_newer_settings(metadata)
        for key, expected in _PINNED.items():
            if key in metadata and metadata[key] != expected:
                raise CheckpointError(
                    f"LTX-2 transformer metadata has {key}={metadata[key]!r}, but the LTX-2 19B DiT needs "
                    f"{expected!r}: this file is a different architecture. Expected {EXPECTED_FILE}.")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in metadata:
                continue
            value = metadata[f.name]
            try:
                kwargs[f.name] = _coerce(f.name, value, f.default)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"LTX-2 transformer metadata: {f.name}={value!r} is not valid ({e}).") from e
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(f"LTX-2 transformer metadata does not describe a valid DiT: {e}.") from e

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Any], *, attention_head_dim: int = 128,
                    audio_attention_head_dim: int = 64, **overrides: Any) -> LTX2TransformerConfig:
        """Infer the config of a file without metadata from its tensor names and shapes.

        Widths come from ``patchify_proj`` / ``audio_patchify_proj`` (in → inner), ``proj_out`` /
        ``audio_proj_out`` (out), ``caption_projection.linear_1`` (caption channels), ``attn2`` /
        ``audio_attn2`` ``to_k`` (context widths); the block count from the largest block index. Head counts are
        not stored in the weights: they are ``inner / head_dim`` with the 19B head dims unless given. Everything
        else takes the 19B values (or ``overrides``).

        Args:
            shapes: name → shape tuple or :class:`~cinetune.core.checkpoint.TensorInfo`. Bare DiT names, or the
                combined file's names (``model.diffusion_model.`` is stripped; connectors and other components are
                ignored).
            attention_head_dim, audio_attention_head_dim: head sizes (128, 64 in the 19B model).
            overrides: other config fields.

        Returns:
            The config.

        Raises:
            NotLTX2CheckpointError: not an LTX-2 audio+video DiT (the message says what it looks like).
            UnsupportedLTX2Error: an LTX-2.3+ or NVFP4 file.
            CheckpointError: a tensor needed for detection is missing or has an impossible shape, or the widths
                are not multiples of the head dims.
        """
        dit = dit_shapes(shapes)
        check_supported(shapes)
        if MARKER_KEY not in dit:
            raise NotLTX2CheckpointError(_not_ltx2_message(dit or _shapes(shapes)))

        def need(key: str, ndim: int) -> tuple[int, ...]:
            if key not in dit:
                raise CheckpointError(f"incomplete LTX-2 DiT: tensor {key!r} is missing; expected {EXPECTED_FILE}.")
            if len(dit[key]) != ndim:
                raise CheckpointError(f"tensor {key!r} has shape {list(dit[key])}, expected {ndim} dims.")
            return dit[key]

        inner, in_ch = need("patchify_proj.weight", 2)
        out_ch, _ = need("proj_out.weight", 2)
        _, caption = need("caption_projection.linear_1.weight", 2)
        a_inner, a_in = need("audio_patchify_proj.weight", 2)
        a_out, _ = need("audio_proj_out.weight", 2)
        _, ctx = need(f"{BLOCK_LIST}.0.attn2.to_k.weight", 2)
        _, a_ctx = need(f"{BLOCK_LIST}.0.audio_attn2.to_k.weight", 2)
        for what, width, hd in (("video", inner, attention_head_dim), ("audio", a_inner, audio_attention_head_dim)):
            if width % hd:
                raise CheckpointError(f"LTX-2 {what} width {width} is not a multiple of the head dim {hd}; pass the "
                                      "right head dim to from_shapes.")
        kwargs: dict[str, Any] = dict(
            num_layers=count_blocks(dit), num_attention_heads=inner // attention_head_dim,
            attention_head_dim=attention_head_dim, in_channels=in_ch, out_channels=out_ch,
            cross_attention_dim=ctx, caption_channels=caption,
            audio_num_attention_heads=a_inner // audio_attention_head_dim,
            audio_attention_head_dim=audio_attention_head_dim, audio_in_channels=a_in, audio_out_channels=a_out,
            audio_cross_attention_dim=a_ctx)
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(f"unsupported LTX-2 DiT dimensions: {e}. Expected {EXPECTED_FILE}.") from e

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> LTX2TransformerConfig:
        """Build the config from a diffusers ``LTX2VideoTransformer3DModel`` ``config.json``.

        Raises:
            UnsupportedLTX2Error: LTX-2.3+ settings (``gated_attn``, ``cross_attn_mod``, no prompt embeddings, …).
            CheckpointError: patch size, VAE scale factors, causal offset or audio timing other than the 19B values
                (the token positions assume them), or sizes that do not fit together.
        """
        newer = [k for k in ("gated_attn", "audio_gated_attn", "cross_attn_mod", "audio_cross_attn_mod",
                             "use_keyframes_abs_pos_embedding") if config.get(k)]
        newer += [k for k in ("use_prompt_embeddings", "ff_bias", "audio_ff_bias", "use_prompt_adaln_single")
                  if config.get(k, True) is False]
        if newer:
            raise UnsupportedLTX2Error(f"{UNSUPPORTED_23} (diffusers config sets {', '.join(newer)}).")
        for key, value in _DIFFUSERS_FIXED.items():
            if key in config and config[key] is not None and _as_tuple(config[key]) != _as_tuple(value):
                raise CheckpointError(f"diffusers LTX-2 config has {key}={config[key]!r}; LTX-2 19B uses {value!r} "
                                      "(token positions are built for that value).")
        kwargs: dict[str, Any] = {}
        for ours, theirs in _DIFFUSERS_CONFIG_NAMES.items():
            if theirs in config and config[theirs] is not None:
                kwargs[ours] = config[theirs]
        if "rope_double_precision" in config:
            kwargs["frequencies_precision"] = "float64" if config["rope_double_precision"] else "float32"
        if any(k in config for k in ("pos_embed_max_pos", "base_height", "base_width")):
            kwargs["positional_embedding_max_pos"] = (int(config.get("pos_embed_max_pos", 20)),
                                                      int(config.get("base_height", 2048)),
                                                      int(config.get("base_width", 2048)))
        if "audio_pos_embed_max_pos" in config:
            kwargs["audio_positional_embedding_max_pos"] = (int(config["audio_pos_embed_max_pos"]),)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"diffusers LTX-2 config does not describe a valid DiT: {e}.") from e

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of diffusers ``LTX2VideoTransformer3DModel`` (0.42) for the same network."""
        kwargs = {theirs: getattr(self, ours) for ours, theirs in _DIFFUSERS_CONFIG_NAMES.items()}
        kwargs.update(
            rope_double_precision=self.double_precision_rope, pos_embed_max_pos=self.positional_embedding_max_pos[0],
            base_height=self.positional_embedding_max_pos[1], base_width=self.positional_embedding_max_pos[2],
            audio_pos_embed_max_pos=self.audio_positional_embedding_max_pos[0], qk_norm="rms_norm_across_heads",
            activation_fn="gelu-approximate", norm_elementwise_affine=False, attention_bias=True,
            attention_out_bias=True, use_prompt_embeddings=True, **_DIFFUSERS_FIXED)
        return kwargs


LTX2_19B = LTX2TransformerConfig()

# Keys the official configurator pins (check_config_value); present with another value → another architecture.
_PINNED: dict[str, Any] = {
    "dropout": 0.0, "attention_bias": True, "num_vector_embeds": None, "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000, "use_linear_projection": False, "only_cross_attention": False,
    "cross_attention_norm": True, "double_self_attention": False, "upcast_attention": False,
    "standardization_norm": "rms_norm", "norm_elementwise_affine": False, "qk_norm": "rms_norm",
    "positional_embedding_type": "rope", "use_audio_video_cross_attention": True, "share_ff": False,
    "av_cross_ada_norm": True, "use_middle_indices_grid": True,
}
# diffusers config values the positions of cinetune.ltx2.rope assume (patch size 1, VAE factors, audio timing).
_DIFFUSERS_FIXED: dict[str, Any] = {
    "patch_size": 1, "patch_size_t": 1, "audio_patch_size": 1, "audio_patch_size_t": 1,
    "vae_scale_factors": VIDEO_SCALE_FACTORS, "causal_offset": CAUSAL_OFFSET,
    "audio_scale_factor": AUDIO_LATENT_DOWNSAMPLE, "audio_sampling_rate": AUDIO_SAMPLE_RATE,
    "audio_hop_length": AUDIO_HOP_LENGTH,
}
_DIFFUSERS_CONFIG_NAMES = {
    "num_layers": "num_layers", "num_attention_heads": "num_attention_heads",
    "attention_head_dim": "attention_head_dim", "in_channels": "in_channels", "out_channels": "out_channels",
    "cross_attention_dim": "cross_attention_dim", "caption_channels": "caption_channels",
    "audio_num_attention_heads": "audio_num_attention_heads", "audio_attention_head_dim": "audio_attention_head_dim",
    "audio_in_channels": "audio_in_channels", "audio_out_channels": "audio_out_channels",
    "audio_cross_attention_dim": "audio_cross_attention_dim", "norm_eps": "norm_eps",
    "positional_embedding_theta": "rope_theta", "timestep_scale_multiplier": "timestep_scale_multiplier",
    "av_ca_timestep_scale_multiplier": "cross_attn_timestep_scale_multiplier", "rope_type": "rope_type",
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Metadata JSON value → field type (lists → tuples, integral floats → int for int fields)."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        return tuple(_as_int(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if isinstance(default, int):
        return _as_int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("expected a number")
        return float(value)
    if name == "frequencies_precision" and value in (None, False):
        return "float32"  # the official code treats anything but "float64" as float32
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def tiny_transformer_metadata() -> dict[str, Any]:
    """A metadata-style ``config.transformer`` dict for a tiny LTX-2 DiT (tests, the embedded tiny model).

    2 blocks; video 2 heads × 16 (width 32), audio 2 heads × 8 (width 16), caption channels 24; connectors
    2 layers of 2 heads × 12 (= 24) with 128 registers (ComfyUI always builds 128, the 19B value, so the tiny file loads natively too). Latent channels stay 128 (the video VAE's 128 channels,
    the audio VAE's 8 × 16). The numerics keys (RoPE, multipliers) are the 19B values, stated explicitly as a real
    file states them.
    """
    return {
        "_class_name": "AVTransformer3DModel", "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
        "in_channels": 128, "out_channels": 128, "cross_attention_dim": 32, "caption_channels": 24,
        "audio_num_attention_heads": 2, "audio_attention_head_dim": 8, "audio_out_channels": 128,
        "audio_cross_attention_dim": 16, "norm_eps": 1e-6, "positional_embedding_theta": 10000.0,
        "positional_embedding_max_pos": [20, 2048, 2048], "audio_positional_embedding_max_pos": [20],
        "timestep_scale_multiplier": 1000, "av_ca_timestep_scale_multiplier": 1000.0, "rope_type": "split",
        "frequencies_precision": "float64", "use_middle_indices_grid": True, "causal_temporal_positioning": True,
        "connector_num_layers": 2, "connector_num_attention_heads": 2, "connector_attention_head_dim": 12,
        "connector_num_learnable_registers": 128, "connector_positional_embedding_max_pos": [4096],
        "connector_norm_output": True, "qk_norm": "rms_norm", "activation_fn": "gelu-approximate",
        "attention_bias": True, "use_audio_video_cross_attention": True, "av_cross_ada_norm": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# fp8 policy


#: Blocks the official fp8 checkpoints keep in bf16 (``EXCLUDED_LAYER_SUBSTRINGS``): the first and the last five.
FP8_HIGH_PRECISION_BLOCKS = frozenset({0, 43, 44, 45, 46, 47})
_BLOCK_NAME = re.compile(re.escape(BLOCK_LIST) + r"\.(\d+)(?:\.(.*))?$")


def ltx2_fp8_keep_high_precision(name: str) -> bool:
    """LTX-2 rule for weight-only fp8: True when the layer at ``name`` stays in high precision.

    Official policy (Lightricks/LTX-2 ``ltx_core/quantization/fp8_scaled_mm.py`` ``EXCLUDED_LAYER_SUBSTRINGS``):
    every layer outside the blocks (``patchify_proj``, ``adaln_single``, the four ``av_ca_*`` AdaLNs,
    ``caption_projection``, ``proj_out`` and their ``audio_*`` twins, norms, scale-shift tables) and all layers of
    block 0 and blocks 43–47 stay high precision; the attention projections and feed-forwards of blocks 1–42 are
    quantised. Norms and ``scale_shift_table*`` inside the blocks are kept too (they are not Linear layers).

    Args:
        name: qualified module (or parameter) name inside the DiT, e.g. ``"transformer_blocks.7.attn1.to_q"``.

    Returns:
        True to keep the layer in high precision.
    """
    m = _BLOCK_NAME.match(name)
    if m is None:
        return True
    if int(m.group(1)) in FP8_HIGH_PRECISION_BLOCKS:
        return True
    rest = m.group(2) or ""
    return "norm" in rest or "scale_shift_table" in rest
