"""Watching the work in a real ComfyUI server: latent previews while the samplers run (the host's preview method,
here ``--preview-method latent2rgb``), progress of the VAE decoders, and the search aliases every node serves.

The server of this module is its own (the shared one runs without previews), with the repository as pack
``cinetune`` and the tiny models. Previews arrive over the websocket as binary frames (``ComfyClient.preview_images``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cinetune.k5.tiny import TINY_NAMES
from cinetune.ltx2.tiny import TINY_LTX2_NAMES

from .comfy_host import ComfyClient, ComfyServer, make_layout
from .models import TINY_LTX2, TINY_SIZE, populate_models, tiny_workflow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NAMES = {**TINY_NAMES, **TINY_LTX2_NAMES}


@pytest.fixture(scope="module")
def preview_host(comfy_host_dir, tmp_path_factory):
    """A server that renders latent previews (latent2rgb) and a client of it."""
    layout = make_layout(tmp_path_factory.mktemp("preview_host"), {"cinetune": ROOT})
    populate_models(layout)
    server = ComfyServer(comfy_host_dir, layout, extra_args=["--preview-method", "latent2rgb"])
    with server, ComfyClient(server.base_url) as client:
        yield server, client


def _api(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / "api" / f"{name}.json").read_text())


def _node_of(prompt: dict, class_type: str) -> str:
    return next(nid for nid, node in prompt.items() if node["class_type"] == class_type)


def _run(client: ComfyClient, prompt: dict) -> tuple[str, list[tuple[str, bytes]]]:
    """Queue ``prompt``, wait for it; its prompt id and the preview images that arrived meanwhile."""
    before = len(client.preview_images())
    prompt_id = client.queue(prompt)
    client.wait(prompt_id, timeout=900)
    return prompt_id, client.preview_images()[before:]


def _assert_previews(previews: list[tuple[str, bytes]], count: int, width: int, height: int) -> None:
    """``count`` or more decodable previews of the video's aspect ratio (the host scales them up to its preview
    size) that are not one flat colour."""
    assert len(previews) >= count, f"{len(previews)} previews for {count} sampling steps"
    for kind, data in previews:
        assert kind == "JPEG"
        image = Image.open(io.BytesIO(data)).convert("RGB")
        assert abs(image.width / image.height - width / height) < 0.05, image.size
        low, high = zip(*image.getextrema())
        assert max(h - lo for lo, h in zip(low, high)) > 0, "a preview of one flat colour"


def _decoder_progress(client: ComfyClient, prompt_id: str, node: str) -> list[tuple[int, int]]:
    return [(e["value"], e["max"]) for e in client.events_of("progress", prompt_id) if e.get("node") == node]


def test_k5_sampler_sends_latent_previews_and_the_decoder_progress(preview_host):
    _, client = preview_host
    prompt = tiny_workflow(_api("k5_text_to_video"), NAMES)
    prompt_id, previews = _run(client, prompt)
    _assert_previews(previews, TINY_SIZE["steps"], TINY_SIZE["width"], TINY_SIZE["height"])
    sampler = _decoder_progress(client, prompt_id, _node_of(prompt, "CinetuneK5Sampler"))
    assert sampler[-1] == (TINY_SIZE["steps"], TINY_SIZE["steps"]), sampler
    decode = _decoder_progress(client, prompt_id, _node_of(prompt, "CinetuneK5VAEDecode"))
    assert decode and decode[-1][0] == decode[-1][1] >= 1, decode


def test_ltx2_sampler_sends_latent_previews_and_the_decoder_progress(preview_host):
    _, client = preview_host
    prompt = tiny_workflow(_api("ltx2_text_to_video"), NAMES)
    prompt_id, previews = _run(client, prompt)
    _assert_previews(previews, TINY_LTX2["steps"], TINY_LTX2["width"], TINY_LTX2["height"])
    decode = _decoder_progress(client, prompt_id, _node_of(prompt, "CinetuneLTX2Decode"))
    assert decode and decode[-1][0] == decode[-1][1] >= 1, decode


def test_every_node_serves_search_aliases_with_its_family_names(preview_host):
    _, client = preview_host
    info = {k: v for k, v in client.object_info().items() if k.startswith("Cinetune")}
    assert len(info) >= 20
    missing = [k for k, v in info.items() if not v.get("search_aliases")]
    assert not missing, f"nodes without search aliases: {missing}"
    for node_id, node in info.items():
        aliases = node["search_aliases"]
        assert all(isinstance(a, str) and a == a.lower() for a in aliases) and len(set(aliases)) == len(aliases)
        if node_id.startswith("CinetuneK5"):
            assert {"kandinsky", "kandinsky 5", "k5"} <= set(aliases), (node_id, aliases)
        if node_id.startswith("CinetuneLTX2"):
            assert {"ltx", "ltx-2", "ltx2"} <= set(aliases), (node_id, aliases)
    assert {"sampler"} <= set(info["CinetuneK5Sampler"]["search_aliases"])
    assert {"vae"} <= set(info["CinetuneLTX2Decode"]["search_aliases"])
    assert {"lora", "train"} <= set(info["CinetuneLTX2TrainLoRA"]["search_aliases"])
    assert {"dataset"} <= set(info["CinetuneDatasetFolder"]["search_aliases"])
