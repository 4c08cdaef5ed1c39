"""The example workflows in the real ComfyUI frontend (headless Chromium against the test server with this pack).

Each workflow is loaded as the template browser loads it; the test reads back what the canvas made of it: node sizes
and slot positions (they must be the generator's, so the frontend did not have to grow a node), the paths the
canvas drew for every link and reroute (rasterised: none may touch a node body other than its ends), the groups,
the note, ``properties.models`` on the loaders and the prompt titles. It also opens the missing-models dialog
(every model file offered for download, none refused) and checks the template listing and thumbnails, the
generator's node tables against ``/object_info``, and the display names in the node library.

Skipped only when Chromium or the playwright package is missing (the server-side checks always run).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from .browser import canvas_geometry, drawn_link_hits, fit_graph, load_workflow, missing_browser_reason, open_frontend

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import make_workflows  # noqa: E402
import workflow_layout as geo  # noqa: E402

pytestmark = pytest.mark.e2e
needs_browser = pytest.mark.skipif(missing_browser_reason() is not None, reason=missing_browser_reason() or "")
NAMES = sorted(make_workflows.WORKFLOWS)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ui(name: str) -> dict:
    return json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())


def _inputs(info: dict) -> list[tuple[str, str]]:
    """(name, type) of a node definition's inputs in order; combo inputs as COMBO."""
    out = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            kind = info["input"][section][name][0]
            out.append((name, "COMBO" if isinstance(kind, list) else kind))
    return out


def test_generator_tables_match_the_node_definitions(comfy_client):
    info = comfy_client.object_info()
    used = {}
    for spec in make_workflows.WORKFLOWS.values():
        used.update({ctype: widgets for _, ctype, widgets, _, _ in spec["nodes"]})
    for ctype, widgets in used.items():
        inputs = _inputs(info[ctype])
        sockets = [(n, t) for n, t in inputs if t not in WIDGET_TYPES]
        assert make_workflows.SOCKETS.get(ctype, []) == sockets, f"{ctype}: socket list out of date"
        names = [n for n, _ in widgets if not (ctype == "LoadImage" and n == "upload")]
        assert names == [n for n, t in inputs if t in WIDGET_TYPES], f"{ctype}: widget list out of date"


def test_display_names_fit_the_sidebar(comfy_client):
    ours = {k: v for k, v in comfy_client.object_info().items() if k.startswith("Cinetune")}
    assert len(ours) >= 30
    for node_id, info in ours.items():
        name = info["display_name"]
        assert "cinetune" not in name.lower() and len(name) <= 36 and name == name.strip(), (node_id, name)


def test_the_template_browser_lists_the_examples_with_thumbnails(comfy_server):
    with urllib.request.urlopen(comfy_server.base_url + "/api/workflow_templates", timeout=30) as response:
        listed = json.loads(response.read())
    assert sorted(listed["cinetune"]) == NAMES
    for name in NAMES:
        url = f"{comfy_server.base_url}/api/workflow_templates/cinetune/{name}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and response.read(3) == b"\xff\xd8\xff"
    for name in {n["widgets_values"][0] for w in NAMES for n in _ui(w)["nodes"] if n["type"] == "LoadImage"}:
        with urllib.request.urlopen(f"{comfy_server.base_url}/api/view?type=input&filename={name}", timeout=30) as r:
            assert r.status == 200  # the start image is in the server's input folder


@pytest.fixture(scope="module")
def page(comfy_server):
    with open_frontend(comfy_server.base_url + "/", viewport={"width": 1600, "height": 1000}) as page:
        yield page


@needs_browser
@pytest.mark.parametrize("name", NAMES)
def test_example_loads_laid_out_grouped_and_annotated(page, name):
    workflow = _ui(name)
    load_workflow(page, workflow)
    fit_graph(page)
    geometry = canvas_geometry(page)
    drawn = drawn_link_hits(page)
    assert drawn == {"hits": [], "undrawn": []}, f"{name}: links drawn through nodes (link, node): {drawn}"

    saved = {n["id"]: n for n in workflow["nodes"]}
    nodes = {n["id"]: n for n in geometry["nodes"]}
    assert set(nodes) == set(saved)
    for nid, node in nodes.items():
        assert [round(v) for v in node["size"]] == saved[nid]["size"], f"{name}: the frontend resized {node['type']}"
        assert [round(v) for v in node["pos"]] == saved[nid]["pos"]
        box = geo.Box(nid, *saved[nid]["size"], [s["name"] for s in saved[nid]["inputs"]], *saved[nid]["pos"])
        sockets = [s for s in node["inputs"] if not s["widget"]]
        assert [s["name"] for s in sockets] == box.inputs, f"{name}: socket rows of {node['type']}"
        for socket in sockets:
            assert socket["pos"] == pytest.approx(box.input_pos(socket["name"]), abs=0.5)
        for slot, output in enumerate(node["outputs"]):
            assert output["pos"] == pytest.approx(box.output_pos(slot), abs=0.5)
        assert node["properties"].get("models") == saved[nid]["properties"].get("models")
    rects = {n["id"]: n["rect"] for n in geometry["nodes"]}
    parents = {link["id"]: link["parentId"] for link in geometry["links"] if link["parentId"] is not None}
    assert geo.link_crossings(rects, geometry["links"], geometry["reroutes"], parents) == []
    assert len(geometry["reroutes"]) == len(workflow["extra"].get("reroutes", []))

    assert [g["title"] for g in geometry["groups"]] == [g["title"] for g in workflow["groups"]]
    assert {g["title"] for g in geometry["groups"]} >= ({"Load", "Train"} if "training" in name else
                                                         {"Load", "Encode", "Sample", "Decode", "Save"})
    (note,) = [n for n in geometry["nodes"] if n["type"] == "MarkdownNote"]
    loaders = [n for n in geometry["nodes"] if n["properties"].get("models")]
    assert loaders and all(m["name"] in note["widgets"][0]["value"] for n in loaders for m in n["properties"]["models"])
    titles = [n["title"] for n in geometry["nodes"] if n["type"].endswith("TextEncode")]
    assert titles and all("negative prompt" in t for t in titles)
    assert not [e for e in page.cinetune_errors if "pageerror" in e], page.cinetune_errors


@needs_browser
@pytest.mark.parametrize("name", ["k5_image_to_video", "ltx2_two_stage"])
def test_missing_models_dialog_offers_every_download(page, name):
    workflow = _ui(name)
    expected = {(m["directory"], m["name"], m["url"])
                for n in workflow["nodes"] for m in n["properties"].get("models", [])}
    load_workflow(page, workflow, dialogs=True)
    dialog = page.locator(".comfy-missing-models")
    dialog.wait_for(timeout=15_000)
    text = dialog.inner_text()
    assert all(f"{folder} / {model}" in text for folder, model, _ in expected), text
    assert "Invalid directory" not in text and "not allowed" not in text and "Only allowed suffixes" not in text
    downloads = dialog.locator("button[aria-label^='Download']")
    assert sorted(downloads.nth(i).get_attribute("title") for i in range(downloads.count())) == \
        sorted(url for _, _, url in expected)
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached", timeout=15_000)  # a dialog still closing keeps the next one from opening
