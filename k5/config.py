"""Kandinsky 5 DiT configurations, released checkpoint variants, and detection from tensor names and shapes.

Sources: kandinskylab/kandinsky-5 ``configs/*.yaml`` (dims, attention, NABLA, RoPE scale, steps, guidance),
``kandinsky/t2v_pipeline.py`` (resolutions, frame count), ``README.md`` and ``comfyui/README.md`` (recommended
scheduler scale); ComfyUI ``comfy/model_detection.py`` (detection by tensor shapes).

Decisions on disputed or unverified points:

- **scheduler_scale** is not read from the yaml by the official inference code. Each variant records the value of
  its yaml where the yaml has one (distilled 5 s: 5, 10 s models: 10, Lite I2V: 10, Pro I2V HD: 5) and otherwise the
  official ComfyUI README recommendation (5 for 5 s text-to-video, 10 for 10 s and image-to-video).
- **nocfg 10 s**: the official yaml points at the sft 10 s file (an upstream slip); the release notes and download
  script list ``kandinsky5lite_t2v_nocfg_10s.safetensors``, so it is its own variant with guidance 1.0 and NABLA.
- **Lite I2V file name**: ``kandinsky5lite_i2v_5s.safetensors`` (config and HF repo); the name in the official
  ``get_I2V_pipeline`` default (``kandinsky5lite_i2v_sft_5s.safetensors``) is accepted as an alias.
- **Pro pretrain** checkpoints have no official config: they get the settings of the matching Pro sft SD variant.
- **Pro HD default size** (not stated officially): 1280×768, the landscape 1024-class size closest to the SD default
  aspect ratio.
- **axes_dims of a file**: the RoPE split of the head dimension is not stored in the weights. All released
  checkpoints split head_dim t:h:w = 1:1.5:1.5 ((16, 24, 24) for head_dim 64, (32, 48, 48) for 128); detection uses
  that split for every head_dim (a multiple of 16), so custom models must follow it (a diffusers folder's
  ``config.json`` may state other ``axes_dims``; the loader uses them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from ..core.checkpoint import CheckpointError, TensorInfo
from .family import K5_LATENT_FORMAT
from .nabla import NablaConfig

LATENT_CHANNELS = K5_LATENT_FORMAT.channels
EXPECTED_FILE = "a Kandinsky 5 DiT .safetensors (e.g. kandinsky5lite_t2v_sft_5s.safetensors) in models/diffusion_models"
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)
# The key official code (and ComfyUI model_detection.py) uses to recognise a Kandinsky 5 DiT.
MARKER_KEY = "visual_transformer_blocks.0.cross_attention.key_norm.weight"


@dataclass(frozen=True)
class K5Config:
    """Dimensions of a Kandinsky 5 DiT (kandinskylab/kandinsky-5 ``kandinsky/models/dit.py`` constructor).

    Attributes:
        model_dim: width D of the token stream. ff_dim: feed-forward hidden width F. time_dim: width Tm of the time
            embedding and modulation input.
        num_text_blocks, num_visual_blocks: transformer block counts.
        axes_dims: RoPE dims per axis (t, h, w); their sum is the head dim.
        visual_embed_dim: input channels per latent voxel: 33 for video (noisy 16 | conditioning 16 | mask 1),
            16 for text-to-image.
        out_visual_dim: output channels (16, the velocity of the latent).
        in_text_dim: Qwen2.5-VL hidden size (3584). in_text_dim2: CLIP-L pooled size (768).
        patch_size: (pt, ph, pw) latent voxels per token.

    Raises:
        ValueError: a dimension is not a positive int, model_dim is not a multiple of the head dim, an axis dim is
            odd, or visual_embed_dim is neither ``out_visual_dim`` nor ``2·out_visual_dim + 1``.
    """

    model_dim: int
    ff_dim: int
    time_dim: int
    num_text_blocks: int
    num_visual_blocks: int
    axes_dims: tuple[int, int, int]
    visual_embed_dim: int = 2 * LATENT_CHANNELS + 1
    out_visual_dim: int = LATENT_CHANNELS
    in_text_dim: int = 3584
    in_text_dim2: int = 768
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims", tuple(self.axes_dims))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        ints = {name: getattr(self, name) for name in (
            "model_dim", "ff_dim", "time_dim", "num_visual_blocks", "visual_embed_dim", "out_visual_dim",
            "in_text_dim", "in_text_dim2")}
        ints.update({f"axes_dims[{i}]": a for i, a in enumerate(self.axes_dims)})
        ints.update({f"patch_size[{i}]": p for i, p in enumerate(self.patch_size)})
        for name, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"K5Config.{name} must be a positive int, got {v!r}")
        if (isinstance(self.num_text_blocks, bool) or not isinstance(self.num_text_blocks, int)
                or self.num_text_blocks < 0):
            raise ValueError(f"K5Config.num_text_blocks must be an int ≥ 0, got {self.num_text_blocks!r}")
        if len(self.axes_dims) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"axes_dims and patch_size need 3 entries (t, h, w); got {self.axes_dims}, "
                             f"{self.patch_size}")
        if any(a % 2 for a in self.axes_dims):
            raise ValueError(f"every RoPE axis dim must be even (rotations act on pairs); got {self.axes_dims}")
        if self.model_dim % self.head_dim:
            raise ValueError(f"model_dim {self.model_dim} must be a multiple of head_dim = sum(axes_dims) = "
                             f"{self.head_dim}")
        if self.model_dim % 2:
            raise ValueError(f"model_dim must be even (sinusoidal time embedding), got {self.model_dim}")
        if self.visual_embed_dim not in (self.out_visual_dim, 2 * self.out_visual_dim + 1):
            raise ValueError(f"visual_embed_dim must be {self.out_visual_dim} (no conditioning) or "
                             f"{2 * self.out_visual_dim + 1} (latent | conditioning | mask), "
                             f"got {self.visual_embed_dim}")

    @property
    def head_dim(self) -> int:
        """Attention head size = sum(axes_dims)."""
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        """model_dim / head_dim."""
        return self.model_dim // self.head_dim

    @property
    def in_visual_dim(self) -> int:
        """Latent channels of the noisy input (16)."""
        return self.out_visual_dim

    @property
    def visual_cond(self) -> bool:
        """True when the input carries conditioning latent + mask channels (all video checkpoints)."""
        return self.visual_embed_dim == 2 * self.in_visual_dim + 1

    @property
    def patch_volume(self) -> int:
        """pt·ph·pw."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def family(self) -> str:
        """``"lite"``, ``"pro"``, ``"image"`` when the dims equal a released model, else ``"custom"``."""
        if self == LITE_CONFIG:
            return "lite"
        if self == PRO_CONFIG:
            return "pro"
        if self in (IMAGE_T2I_CONFIG, IMAGE_I2I_CONFIG):
            return "image"
        return "custom"


LITE_CONFIG = K5Config(model_dim=1792, ff_dim=7168, time_dim=512, num_text_blocks=2, num_visual_blocks=32,
                       axes_dims=(16, 24, 24))
PRO_CONFIG = K5Config(model_dim=4096, ff_dim=16384, time_dim=1024, num_text_blocks=4, num_visual_blocks=60,
                      axes_dims=(32, 48, 48))
IMAGE_T2I_CONFIG = K5Config(model_dim=2560, ff_dim=10240, time_dim=512, num_text_blocks=2, num_visual_blocks=50,
                            axes_dims=(32, 48, 48), visual_embed_dim=LATENT_CHANNELS)
IMAGE_I2I_CONFIG = K5Config(model_dim=2560, ff_dim=10240, time_dim=512, num_text_blocks=2, num_visual_blocks=50,
                            axes_dims=(32, 48, 48))


# ---------------------------------------------------------------------------------------------------------------
# Variants

SIZES_512 = ((512, 512), (768, 512), (512, 768))  # (W, H), kandinskylab/kandinsky-5 t2v_pipeline.py
SIZES_1024 = ((1024, 1024), (1408, 640), (640, 1408), (1280, 768), (768, 1280), (1152, 896), (896, 1152))
FRAMES_5S = 121  # 5 s · 24 fps → 31 latent frames → 4·30 + 1 video frames
FRAMES_10S = 241
ROPE_SD = (1.0, 2.0, 2.0)
ROPE_HD = (1.0, 3.16, 3.16)
ROPE_IMAGE = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class K5Variant:
    """One released checkpoint with its official inference settings (kandinskylab/kandinsky-5 ``configs/*.yaml``).

    Attributes:
        id: stable snake_case id (saved in workflows; never renamed).
        title: human-readable name.
        family: ``"lite"``, ``"pro"`` or ``"image"``. task: ``"t2v"``, ``"i2v"``, ``"t2i"`` or ``"i2i"``.
        file_names: official file names (first = canonical).
        steps: Euler steps. guidance: CFG scale (1.0 = no CFG). scheduler_scale: flow shift k.
        attention: ``"full"`` or ``"nabla"``; nabla: its settings (None for full attention).
        rope_scale: RoPE position divisors (t, h, w).
        sizes: supported (W, H) pixel sizes; default_size: (W, H).
        frames: video frames (4k+1; 1 for image models). fps: frames per second.
    """

    id: str
    title: str
    family: str
    task: str
    file_names: tuple[str, ...]
    steps: int
    guidance: float
    scheduler_scale: float
    attention: str
    nabla: NablaConfig | None
    rope_scale: tuple[float, float, float]
    sizes: tuple[tuple[int, int], ...]
    default_size: tuple[int, int]
    frames: int
    fps: int = 24

    @property
    def visual_embed_dim(self) -> int:
        """Input channels per voxel the variant's checkpoint has (16 for text-to-image, else 33)."""
        return LATENT_CHANNELS if self.task == "t2i" else 2 * LATENT_CHANNELS + 1


def _video(id_: str, title: str, family: str, task: str, files: tuple[str, ...], *, seconds: int, P: float | None,
           steps: int = 50, guidance: float = 5.0, scale: float, hd: bool = False) -> K5Variant:
    return K5Variant(
        id=id_, title=title, family=family, task=task, file_names=files, steps=steps, guidance=guidance,
        scheduler_scale=scale, attention="full" if P is None else "nabla",
        nabla=None if P is None else NablaConfig(P=P, window=(11, 3, 3), sta=True),
        rope_scale=ROPE_HD if hd else ROPE_SD, sizes=SIZES_1024 if hd else SIZES_512,
        default_size=(1280, 768) if hd else (768, 512), frames=FRAMES_5S if seconds == 5 else FRAMES_10S)


def _lite_t2v(kind: str, title: str, *, steps: int = 50, guidance: float = 5.0) -> list[K5Variant]:
    return [
        _video(f"lite_t2v_{kind}_5s", f"Lite T2V {title} 5s", "lite", "t2v",
               (f"kandinsky5lite_t2v_{kind}_5s.safetensors",), seconds=5, P=None, steps=steps, guidance=guidance,
               scale=5.0),
        _video(f"lite_t2v_{kind}_10s", f"Lite T2V {title} 10s", "lite", "t2v",
               (f"kandinsky5lite_t2v_{kind}_10s.safetensors",), seconds=10, P=0.9, steps=steps, guidance=guidance,
               scale=10.0),
    ]


def _pro(task: str, kind: str, seconds: int, *, P_sd: float | None, P_hd: float | None, scale_sd: float,
         scale_hd: float) -> list[K5Variant]:
    stem = f"kandinsky5pro_{task}_{kind}_{seconds}s.safetensors"
    base = f"pro_{task}_{kind}_{seconds}s"
    title = f"Pro {task.upper()} {kind} {seconds}s"
    out = [_video(base, f"{title} SD", "pro", task, (stem,), seconds=seconds, P=P_sd, scale=scale_sd)]
    if P_hd is not None:
        out.append(_video(f"{base}_hd", f"{title} HD", "pro", task, (stem,), seconds=seconds, P=P_hd,
                          scale=scale_hd, hd=True))
    return out


def _image(id_: str, title: str, task: str, file_name: str) -> K5Variant:
    return K5Variant(id=id_, title=title, family="image", task=task, file_names=(file_name,), steps=50, guidance=3.5,
                     scheduler_scale=3.0, attention="full", nabla=None, rope_scale=ROPE_IMAGE, sizes=SIZES_1024,
                     default_size=(1024, 1024), frames=1)


_ALL: list[K5Variant] = [
    *_lite_t2v("sft", "sft"),
    *_lite_t2v("pretrain", "pretrain"),
    *_lite_t2v("nocfg", "no-CFG", guidance=1.0),
    *_lite_t2v("distilled16steps", "distilled 16 steps", steps=16, guidance=1.0),
    _video("lite_i2v_5s", "Lite I2V 5s", "lite", "i2v",
           ("kandinsky5lite_i2v_5s.safetensors", "kandinsky5lite_i2v_sft_5s.safetensors"), seconds=5, P=None,
           scale=10.0),
    *_pro("t2v", "sft", 5, P_sd=None, P_hd=0.8, scale_sd=5.0, scale_hd=5.0),
    *_pro("t2v", "sft", 10, P_sd=0.9, P_hd=0.7, scale_sd=10.0, scale_hd=10.0),
    *_pro("i2v", "sft", 5, P_sd=None, P_hd=0.8, scale_sd=10.0, scale_hd=5.0),
    *_pro("t2v", "pretrain", 5, P_sd=None, P_hd=None, scale_sd=5.0, scale_hd=5.0),
    *_pro("t2v", "pretrain", 10, P_sd=0.9, P_hd=None, scale_sd=10.0, scale_hd=10.0),
    _image("lite_t2i", "Image Lite T2I", "t2i", "kandinsky5lite_t2i.safetensors"),
    _image("lite_i2i", "Image Lite I2I", "i2i", "kandinsky5lite_i2i.safetensors"),
]
VARIANTS: dict[str, K5Variant] = {v.id: v for v in _ALL}
_DEFAULTS = {("lite", "t2v"): "lite_t2v_sft_5s", ("lite", "i2v"): "lite_i2v_5s",
             ("pro", "t2v"): "pro_t2v_sft_5s", ("pro", "i2v"): "pro_i2v_sft_5s",
             ("image", "t2i"): "lite_t2i", ("image", "i2i"): "lite_i2i"}


# ---------------------------------------------------------------------------------------------------------------
# Detection


class NotK5CheckpointError(CheckpointError):
    """The file is a model file, but not a Kandinsky 5 DiT (the message says what it looks like)."""


def _shapes(infos: Mapping[str, TensorInfo] | Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, info in infos.items():
        shape = getattr(info, "shape", info)
        out[name] = tuple(int(s) for s in shape)
    return out


def _looks_like(names: list[str]) -> str:
    """Best guess at what a non-K5 tensor set is, for error messages."""
    def has(*parts: str) -> bool:
        return any(any(p in n for p in parts) for n in names)

    if has("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "lora_unet_"):
        return "a LoRA (adapter weights, not a base model): load it with a LoRA loader on top of the DiT"
    if has("audio_adaln_single", "av_ca_", "audio_patchify_proj") or (
            has("patchify_proj", "adaln_single") and has("transformer_blocks.")):
        return "an LTX-2 checkpoint: load it with the LTX-2 loader"
    if has("encoder.down_blocks", "decoder.up_blocks", "decoder.conv_in", "encoder.conv_in", "quant_conv"):
        return "a VAE: put it in models/vae and load it with the VAE loader"
    if has("model.layers.", "text_model.", "embed_tokens", "language_model.", "transformer.resblocks",
           "encoder.block.", "visual.blocks."):
        return "a text encoder: put it in models/text_encoders and load it with the text encoder loader"
    if has("transformer_blocks.", "double_blocks.", "single_blocks.", "blocks.0."):
        return "the DiT of another model family"
    return "not a Kandinsky 5 DiT"


def _require(shapes: dict[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes:
        raise NotK5CheckpointError(
            f"incomplete Kandinsky 5 DiT: tensor {key!r} is missing; expected {EXPECTED_FILE}.")
    shape = shapes[key]
    if len(shape) != ndim:
        raise NotK5CheckpointError(
            f"tensor {key!r} has shape {list(shape)}, expected {ndim} dims; expected {EXPECTED_FILE}.")
    return shape


def _count_blocks(names, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(idx) + 1 if idx else 0


def axes_dims_for(head_dim: int) -> tuple[int, int, int]:
    """RoPE axis split (t, h, w) = (hd/4, 3hd/8, 3hd/8), as in every released checkpoint ((16, 24, 24) for 64,
    (32, 48, 48) for 128; kandinskylab/kandinsky-5 configs).

    Raises:
        ValueError: head_dim not a positive multiple of 16 (the split would give odd axis dims).
    """
    if head_dim < 16 or head_dim % 16:
        raise ValueError(f"head_dim {head_dim} is not a multiple of 16: cannot infer the RoPE axes split; "
                         "build K5Config with explicit axes_dims")
    return head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8


def detect_config(infos: Mapping[str, TensorInfo] | Mapping[str, tuple]) -> K5Config:
    """Infer the :class:`K5Config` of a DiT from its tensor names and shapes (no data needed).

    Names are the official state-dict names without prefix. Rules follow ComfyUI
    ``comfy/model_detection.py``: K5 iff ``visual_transformer_blocks.0.cross_attention.key_norm.weight`` exists;
    ``model_dim`` from ``visual_embeddings.in_layer.weight [D, p·Cin]``, ``time_dim`` from
    ``time_embeddings.in_layer.weight [Tm, D]``, ``ff_dim`` from the first visual feed-forward, head dim from the
    query-norm weight, block counts from the largest block index, ``out_visual_dim·p`` from
    ``out_layer.out_layer.weight``; ``axes_dims`` from :func:`axes_dims_for`.

    Args:
        infos: name → :class:`~cinetune.core.checkpoint.TensorInfo`, or name → shape tuple.

    Returns:
        The config.

    Raises:
        NotK5CheckpointError: the tensors are not a K5 DiT (the message says what they look like — LTX-2, VAE, text
            encoder, LoRA, another DiT — and what was expected), or a tensor needed for detection is missing or
            has an impossible shape.
    """
    shapes = _shapes(infos)
    names = list(shapes)
    if MARKER_KEY not in shapes:
        prefixed = [n[: -len(MARKER_KEY)] for n in names if n.endswith(MARKER_KEY)]
        if prefixed:
            raise NotK5CheckpointError(
                f"Kandinsky 5 DiT keys carry the prefix {prefixed[0]!r}; strip it (load_k5_dit does) before detection.")
        sample = ", ".join(names[:3]) or "no tensors"
        raise NotK5CheckpointError(
            f"this looks like {_looks_like(names)} (no tensor {MARKER_KEY!r}; first keys: {sample}). "
            f"Expected {EXPECTED_FILE}.")

    D, in_feats = _require(shapes, "visual_embeddings.in_layer.weight", 2)
    Tm, D_time = _require(shapes, "time_embeddings.in_layer.weight", 2)
    F_, D_ff = _require(shapes, "visual_transformer_blocks.0.feed_forward.in_layer.weight", 2)
    (hd,) = _require(shapes, "visual_transformer_blocks.0.self_attention.query_norm.weight", 1)
    out_feats, D_out = _require(shapes, "out_layer.out_layer.weight", 2)
    D_text, in_text = _require(shapes, "text_embeddings.in_layer.weight", 2)
    Tm_pool, in_text2 = _require(shapes, "pooled_text_embeddings.in_layer.weight", 2)
    if len({D, D_time, D_ff, D_out, D_text}) != 1 or Tm_pool != Tm:
        raise NotK5CheckpointError(
            f"inconsistent Kandinsky 5 DiT shapes (model_dim {D} vs {D_time}/{D_ff}/{D_out}/{D_text}, time_dim {Tm} "
            f"vs {Tm_pool}); the file is damaged or a different architecture. Expected {EXPECTED_FILE}.")
    patch_volume = 4  # (1, 2, 2) in every release
    if out_feats % patch_volume or in_feats % patch_volume:
        raise NotK5CheckpointError(
            f"patch features in {in_feats} / out {out_feats} are not multiples of the K5 patch volume 4 (1×2×2); "
            f"expected {EXPECTED_FILE}.")
    try:
        axes = axes_dims_for(hd)
        return K5Config(model_dim=D, ff_dim=F_, time_dim=Tm,
                        num_text_blocks=_count_blocks(names, "text_transformer_blocks."),
                        num_visual_blocks=_count_blocks(names, "visual_transformer_blocks."),
                        axes_dims=axes, visual_embed_dim=in_feats // patch_volume,
                        out_visual_dim=out_feats // patch_volume, in_text_dim=in_text, in_text_dim2=in_text2)
    except ValueError as e:
        raise NotK5CheckpointError(f"unsupported Kandinsky 5 DiT dimensions: {e}. Expected {EXPECTED_FILE}.") from e


# ---------------------------------------------------------------------------------------------------------------
# Variant resolution


def _has_token(stem: str, token: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){token}(?![a-z0-9])", stem) is not None


def _compatible(variant: K5Variant, config: K5Config) -> bool:
    family = config.family
    if variant.visual_embed_dim != config.visual_embed_dim:
        return False
    return family == "custom" or family == variant.family


def _by_file_name(config: K5Config, stem: str) -> K5Variant | None:
    best: list[K5Variant] = []
    best_len = 0
    for v in VARIANTS.values():
        if not _compatible(v, config):
            continue
        for fn in v.file_names:
            official = fn.rsplit(".", 1)[0].lower()
            if official in stem and len(official) >= best_len:
                if len(official) > best_len:
                    best, best_len = [], len(official)
                best.append(v)
    if not best:
        return None
    if len(best) > 1:  # the SD and HD configs of one Pro file
        want_hd = _has_token(stem, "hd")
        for v in best:
            if v.id.endswith("_hd") == want_hd:
                return v
    return best[0]


def _by_family(config: K5Config, stem: str) -> K5Variant:
    family = config.family
    if family == "image" or (family == "custom" and not config.visual_cond):
        return VARIANTS[_DEFAULTS[("image", "i2i" if config.visual_cond else "t2i")]]
    task = "i2v" if "i2v" in stem else "t2v"
    if family == "custom":
        return VARIANTS[_DEFAULTS[("lite", task)]]
    seconds = "10s" if "10s" in stem else "5s"
    hd = "_hd" if _has_token(stem, "hd") else ""
    if task == "i2v":
        candidates = [f"{family}_i2v_sft_5s{hd}", f"{family}_i2v_5s"]
    else:
        kind = next((k for key, k in (("distil", "distilled16steps"), ("nocfg", "nocfg"), ("pretrain", "pretrain"))
                     if key in stem), "sft")
        candidates = [f"{family}_t2v_{kind}_{seconds}{hd}", f"{family}_t2v_{kind}_{seconds}",
                      f"{family}_t2v_sft_{seconds}{hd}"]
    for c in candidates:
        if c in VARIANTS:
            return VARIANTS[c]
    return VARIANTS[_DEFAULTS[(family, task)]]


def resolve_variant(config: K5Config, filename: str, requested: str = "auto") -> K5Variant:
    """Pick the variant (inference settings) for a loaded DiT.

    ``requested="auto"``: the official file name contained in ``filename`` (case-insensitive; the longest match
    wins); a Pro file with SD and HD configs resolves to SD unless the name has an ``hd`` token
    (e.g. ``kandinsky5pro_t2v_sft_5s_hd.safetensors``). Otherwise the family from the dims and keywords in the name
    (``i2v``, ``10s``, ``hd``, ``distil``, ``nocfg``, ``pretrain``); custom dims (small test models) give
    ``lite_t2v_sft_5s``, or ``lite_i2v_5s`` when the name contains ``i2v``.

    Args:
        config: detected config (:func:`detect_config`).
        filename: file name or path of the checkpoint (only the last component is used).
        requested: ``"auto"`` or a key of :data:`VARIANTS`.

    Returns:
        The :class:`K5Variant`.

    Raises:
        ValueError: ``requested`` is not a variant id (the message lists them), or its family / input channels do not
            match the checkpoint's dims (e.g. a Pro variant for a Lite file).
    """
    stem = re.split(r"[\\/]", str(filename))[-1].lower()
    if requested != "auto":
        if requested not in VARIANTS:
            raise ValueError(f"unknown Kandinsky 5 variant {requested!r}; valid: auto, {', '.join(VARIANTS)}")
        v = VARIANTS[requested]
        if not _compatible(v, config):
            what = (f"{config.family} dims (model_dim {config.model_dim})" if config.family != "custom"
                    else f"{config.visual_embed_dim} input channels")
            raise ValueError(
                f"variant {requested!r} is for {v.family} checkpoints ({v.file_names[0]}), but this file has {what}; "
                f"choose a {config.family} variant or 'auto'")
        return v
    return _by_file_name(config, stem) or _by_family(config, stem)
