"""LTX-2 interop with ComfyUI's own LTX-2 support, on hosts that have it (native LTX-2 arrived in ComfyUI 0.8.0;
on older hosts, such as the 0.3.75 CI host, every test here is skipped with the reason).

- In the server: the video and audio LATENTs of our LTX-2 Sampler decoded by the native nodes from the same tiny
  combined checkpoint (CheckpointLoaderSimple's VAE + VAEDecode; LTXVAudioVAELoader + LTXVAudioVAEDecode) match
  our LTX-2 Decode. Results go through the native savers (8-bit PNG frames, FLAC audio), so they are compared
  within the savers' quantisation.
- In a child process (ComfyUI's modules never enter the test process): the host's own VAE classes decode the same
  random latents as our decoders, compared at float32.
- The host's LoRA key map of its native LTX-2 model (built by its own model detection from our tiny checkpoint)
  takes every key of LoRAs saved by ``core.lora_formats.save_lora`` and of the official-layout distilled LoRA, and
  merges them into the same weights as our formula.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .models import TINY_LTX2, tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NATIVE_NODES = ("CheckpointLoaderSimple", "VAEDecode", "SaveImage", "LTXVAudioVAELoader", "LTXVAudioVAEDecode",
                "SaveAudio")
# SaveImage truncates 255·x to uint8 and SaveAudio writes 16-bit FLAC: identical float results give identical
# files, and a float difference below one quantisation step can still flip one level.
PNG_LEVELS = 1
FLAC_LSB = 2 / 32768


def _host_version(host: Path) -> str:
    text = (host / "comfyui_version.py").read_text() if (host / "comfyui_version.py").is_file() else ""
    return text.split("__version__ =", 1)[1].strip().strip("\"'") if "__version__ =" in text else "(unknown)"


@pytest.fixture(scope="module")
def native_ltx2(comfy_client, comfy_host_dir):
    """Skips the module's tests unless the host registers ComfyUI's native LTX-2 nodes."""
    info = comfy_client.object_info()
    missing = [n for n in NATIVE_NODES if n not in info]
    if missing:
        pytest.skip(f"ComfyUI {_host_version(comfy_host_dir)} has no native LTX-2 support (missing nodes: "
                    f"{', '.join(missing)}; they arrived in ComfyUI 0.8.0)")


def _names() -> dict[str, str]:
    from cinetune.ltx2.tiny import TINY_LTX2_NAMES

    return dict(TINY_LTX2_NAMES)


def _our_graph(names: dict[str, str]) -> dict:
    """Loader → text encode → sampler → our Decode (untiled, so both sides decode the latent whole)."""
    api = json.loads((ROOT / "example_workflows" / "api" / "ltx2_text_to_video.json").read_text())
    api = tiny_workflow(api, names)
    graph = {k: v for k, v in api.items() if v["class_type"] != "CinetuneSaveVideo"}
    decode = next(k for k, v in graph.items() if v["class_type"] == "CinetuneLTX2Decode")
    graph[decode]["inputs"]["tiling"] = False
    return graph


def _ids(graph: dict) -> tuple[str, str]:
    sampler = next(k for k, v in graph.items() if v["class_type"] == "CinetuneLTX2Sampler")
    decode = next(k for k, v in graph.items() if v["class_type"] == "CinetuneLTX2Decode")
    return sampler, decode


def _saved(comfy_layout, entry: dict, node_id: str, kind: str) -> list[Path]:
    """Files one saver node wrote, in its order (``kind``: "images" or "audio")."""
    items = entry["outputs"][node_id][kind]
    return [Path(comfy_layout.output) / (i.get("subfolder") or "") / i["filename"] for i in items]


def _read_frames(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths])


def _read_flac(path: Path) -> tuple[np.ndarray, int]:
    """Waveform ``[channels, samples]`` in [-1, 1] and sample rate of an audio file."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        channels, chunks = stream.codec_context.channels, []
        for frame in container.decode(stream):
            data = frame.to_ndarray()
            chunks.append(data if frame.format.is_planar else data.reshape(-1, channels).T)
        rate = stream.codec_context.sample_rate
    wave = np.concatenate(chunks, axis=1)
    if np.issubdtype(wave.dtype, np.integer):
        wave = wave.astype(np.float64) / float(np.iinfo(wave.dtype).max + 1)
    return wave, rate


def test_native_video_vae_decodes_our_video_latent(native_ltx2, comfy_client, comfy_layout):
    names = _names()
    graph = _our_graph(names)
    sampler, decode = _ids(graph)
    graph.update({
        "90": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["ltx2"]}},
        "91": {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["90", 2]}},
        "92": {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": "interop/native_video"}},
        "93": {"class_type": "SaveImage", "inputs": {"images": [decode, 0], "filename_prefix": "interop/ours_video"}},
    })
    entry = comfy_client.run(graph, timeout=900)
    native = _read_frames(_saved(comfy_layout, entry, "92", "images"))
    ours = _read_frames(_saved(comfy_layout, entry, "93", "images"))
    assert ours.shape == (TINY_LTX2["frames"], TINY_LTX2["height"], TINY_LTX2["width"], 3)
    assert native.shape == ours.shape
    assert ours.std() > 5, "decoded frames are flat: the comparison would prove nothing"
    assert np.abs(native - ours).max() <= PNG_LEVELS


def test_native_audio_vae_decodes_our_audio_latent(native_ltx2, comfy_client, comfy_layout):
    from cinetune.ltx2.audio import audio_latent_frames

    names = _names()
    graph = _our_graph(names)
    sampler, decode = _ids(graph)
    graph.update({
        "95": {"class_type": "LTXVAudioVAELoader", "inputs": {"ckpt_name": names["ltx2"]}},
        "96": {"class_type": "LTXVAudioVAEDecode", "inputs": {"samples": [sampler, 1], "audio_vae": ["95", 0]}},
        "97": {"class_type": "SaveAudio", "inputs": {"audio": ["96", 0], "filename_prefix": "interop/native_audio"}},
        "98": {"class_type": "SaveAudio", "inputs": {"audio": [decode, 1], "filename_prefix": "interop/ours_audio"}},
    })
    entry = comfy_client.run(graph, timeout=900)
    (native_path,) = _saved(comfy_layout, entry, "97", "audio")
    (ours_path,) = _saved(comfy_layout, entry, "98", "audio")
    native, native_rate = _read_flac(native_path)
    ours, ours_rate = _read_flac(ours_path)
    assert native_rate == ours_rate == 24000
    latent_frames = audio_latent_frames(TINY_LTX2["frames"], TINY_LTX2["fps"])
    assert native.shape == ours.shape == (2, (4 * latent_frames - 3) * 240)
    assert np.abs(ours).max() > 100 * FLAC_LSB, "silent audio: the comparison would prove nothing"
    # The tiny vocoder's output hardly depends on its input, so this mostly proves the latent's shape and that the
    # native node runs; test_host_decoders_match_ours_at_float32 compares the latent-dependent part.
    assert np.abs(native - ours).max() <= FLAC_LSB


# ---------------------------------------------------------------------------------------------------------------
# Host decoders at float32 (child process)

_DECODE_SCRIPT = r"""
import sys
host, ckpt, latents_path, out_path = sys.argv[1:]
sys.path.insert(0, host)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.sd, comfy.utils
from safetensors.torch import load_file, save_file

sd, metadata = comfy.utils.load_torch_file(ckpt, return_metadata=True)
video_sd = comfy.utils.state_dict_prefix_replace(sd, {"vae.": ""}, filter_keys=True)
video_vae = comfy.sd.VAE(sd=video_sd, metadata=metadata)
video_vae.throw_exception_if_invalid()
audio_vae = comfy.sd.VAE(sd=comfy.utils.state_dict_prefix_replace(
    sd, {"audio_vae.": "autoencoder.", "vocoder.": "vocoder."}, filter_keys=True), metadata=metadata)
audio_vae.throw_exception_if_invalid()
out = {}
with torch.inference_mode():
    for name, latent in load_file(latents_path).items():
        if name.startswith("video"):
            out[name] = video_vae.decode(latent).float().contiguous()
        else:
            out[name] = audio_vae.decode(latent).movedim(-1, 1).float().contiguous()
save_file(out, out_path, metadata={"sample_rate": str(int(audio_vae.first_stage_model.output_sample_rate))})
"""


def _host_decode(host: Path, ckpt: Path, latents: dict, tmp_path: Path) -> tuple[dict, int]:
    save_file(latents, tmp_path / "latents.safetensors")
    script = tmp_path / "host_decode.py"
    script.write_text(_DECODE_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(host), str(ckpt), str(tmp_path / "latents.safetensors"),
                             str(tmp_path / "decoded.safetensors")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(tmp_path / "decoded.safetensors", "pt") as f:
        rate = int(f.metadata()["sample_rate"])
    return load_file(tmp_path / "decoded.safetensors"), rate


def test_host_decoders_match_ours_at_float32(native_ltx2, comfy_host_dir, comfy_layout, tmp_path):
    from cinetune.ltx2 import pipeline
    from cinetune.ltx2.loader import load_ltx2_vae

    ckpt = Path(comfy_layout.models) / "checkpoints" / _names()["ltx2"]
    g = torch.Generator().manual_seed(0)
    audio_latent = torch.randn(1, 8, 7, 16, generator=g)
    latents = {"video": torch.randn(1, 128, 2, 2, 4, generator=g), "audio": audio_latent,
               "audio_scaled": 3 * audio_latent}
    host, rate = _host_decode(comfy_host_dir, ckpt, latents, tmp_path)
    vaes = load_ltx2_vae(ckpt, ckpt, dtype=torch.float32)
    with torch.inference_mode():
        frames = pipeline.decode_video(vaes, latents["video"], tiling=False)
        audio = {k: pipeline.decode_audio(vaes, latents[k]) for k in ("audio", "audio_scaled")}
    host_frames = host["video"].reshape(frames.shape)
    assert frames.std() > 0.02
    assert (frames - host_frames).abs().max() <= 1e-5
    assert rate == audio["audio"]["sample_rate"]
    for key in ("audio", "audio_scaled"):
        assert audio[key]["waveform"].shape == host[key].shape
        assert (audio[key]["waveform"] - host[key]).abs().max() <= 1e-5
    # The latent-dependent part of the waveform, so a misread layout cannot hide behind the decoder's biases.
    ours_delta = audio["audio_scaled"]["waveform"] - audio["audio"]["waveform"]
    host_delta = host["audio_scaled"] - host["audio"]
    assert ours_delta.abs().max() > 0
    assert (ours_delta - host_delta).abs().max() <= 1e-3 * ours_delta.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# LoRA keys through the host's key map of its native LTX-2 model (child process)

_LORA_SCRIPT = r"""
import json, logging, sys
host, ckpt, strength, out_path, *lora_paths = sys.argv[1:]
sys.path.insert(0, host)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.lora, comfy.model_detection, comfy.utils
from safetensors.torch import load_file, save_file

class Grab(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

grab = Grab()
logging.getLogger().addHandler(grab)
sd, metadata = comfy.utils.load_torch_file(ckpt, return_metadata=True)
prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
config = comfy.model_detection.model_config_from_unet(sd, prefix, metadata=metadata)
config.set_inference_dtype(torch.float32, None)
model = config.get_model(sd, prefix)
key_map = comfy.lora.model_lora_keys_unet(model, {})
report, merged = {"model_class": type(model).__name__}, {}
for i, path in enumerate(lora_paths):
    grab.messages.clear()
    patches = comfy.lora.load_lora(load_file(path), key_map)
    lost = "lora key not loaded: "
    report[path] = {"not_loaded": [m[len(lost):] for m in grab.messages if m.startswith(lost)],
                    "patched": sorted(patches)}
    for key, adapter in patches.items():
        base = sd[prefix + key[len("diffusion_model."):]].float()
        merged[f"{i}/{key}"] = comfy.lora.calculate_weight([(float(strength), adapter, 1.0, None, None)], base, key)
save_file(merged, out_path)
print("REPORT" + json.dumps(report))
"""


def _host_lora_report(host: Path, ckpt: Path, strength: float, loras: list[Path], tmp_path: Path) -> dict:
    script = tmp_path / "host_lora.py"
    script.write_text(_LORA_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(host), str(ckpt), str(strength),
                             str(tmp_path / "merged.safetensors"), *map(str, loras)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT", 1)[1])


def _saved_lora(tmp_path: Path, layout: str) -> Path:
    from cinetune.core.lora import inject_lora
    from cinetune.core.lora_formats import save_lora
    from cinetune.ltx2.config import LTX2_BLOCK_PREFIXES, LTX2_LORA_TARGETS, LTX2TransformerConfig
    from cinetune.ltx2.config import tiny_transformer_metadata
    from cinetune.ltx2.dit import LTX2DiT

    model = LTX2DiT(LTX2TransformerConfig.from_metadata(tiny_transformer_metadata()))
    modules = inject_lora(model, rank=4, alpha=2.0, targets=LTX2_LORA_TARGETS, within=LTX2_BLOCK_PREFIXES,
                          generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in modules.values():
            module.lora_up.copy_(torch.randn(module.lora_up.shape, generator=g))
    return save_lora(tmp_path / f"ours_{layout}.safetensors", modules, metadata={}, layout=layout)


def _lora_pairs(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module path: (down, up, scale)}`` of a LoRA file in any of the layouts written here."""
    tensors = load_file(path)
    pairs = {}
    for key in tensors:
        for down_tag, up_tag in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(down_tag):
                stem = key[: -len(down_tag)]
                down, up = tensors[key].float(), tensors[stem + up_tag].float()
                alpha = tensors.get(stem + ".alpha")
                pairs[stem] = (down, up, 1.0 if alpha is None else float(alpha) / down.shape[0])
    return pairs


def test_saved_loras_map_completely_onto_the_native_ltx2_model(native_ltx2, comfy_host_dir, comfy_layout, tmp_path):
    from cinetune.ltx2.config import DIT_PREFIX

    ckpt = Path(comfy_layout.models) / "checkpoints" / _names()["ltx2"]
    loras = [_saved_lora(tmp_path, "comfyui"), _saved_lora(tmp_path, "kohya"),
             Path(comfy_layout.models) / "loras" / _names()["ltx2_distilled_lora"]]
    strength = 0.8
    report = _host_lora_report(comfy_host_dir, ckpt, strength, loras, tmp_path)
    assert report["model_class"] == "LTXAV"
    merged = load_file(tmp_path / "merged.safetensors")
    with safe_open(ckpt, "pt") as f:
        for index, lora in enumerate(loras):
            entry = report[str(lora)]
            assert entry["not_loaded"] == [], f"{lora.name}: keys the host ignores: {entry['not_loaded'][:5]}"
            pairs = _lora_pairs(lora)
            assert len(entry["patched"]) == len(pairs) > 0
            if "kohya" in lora.name:
                # Same adapters as the comfyui-layout file, named the kohya way: the host must merge them alike.
                assert entry["patched"] == report[str(loras[0])]["patched"]
                for key in entry["patched"]:
                    assert torch.equal(merged[f"{index}/{key}"], merged[f"0/{key}"])
                continue
            for stem, (down, up, scale) in pairs.items():
                path = stem.removeprefix("diffusion_model.")
                key = f"diffusion_model.{path}.weight"
                assert key in entry["patched"]
                expected = f.get_tensor(f"{DIT_PREFIX}{path}.weight").float() + strength * scale * (up @ down)
                torch.testing.assert_close(merged[f"{index}/{key}"], expected, rtol=1e-5, atol=1e-5)
