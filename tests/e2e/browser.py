"""Drive the ComfyUI frontend in headless Chromium (Playwright, sync API) and watch the live loss chart.

Free of pytest. Needs the ``playwright`` Python package and a Chromium binary from the system (Playwright's own
browser download is not used): ``apt-get install -y chromium`` and ``pip install playwright``. The binary is
taken from ``$CINETUNE_CHROMIUM`` when set, else the first of ``chromium``, ``chromium-browser``,
``google-chrome`` on ``PATH``.

``watch_loss_chart`` opens the frontend, loads a UI-format workflow, queues it, waits until the trainer
node's chart has drawn enough points and returns what it saw (``ChartWatch``). ``open_frontend`` /
``load_workflow`` / ``canvas_geometry`` / ``drawn_link_hits`` load a workflow and read back how the frontend lays it
out and draws its links (for the example-workflow layout test and ``scripts/screenshot_workflows.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage")
INSTALL_HINT = "apt-get install -y chromium && pip install playwright (no `playwright install` needed)"
APP_READY_TIMEOUT_S = 60.0
CHART_TIMEOUT_S = 15.0
STARTUP_GRAPH_TIMEOUT_S = 10.0
VIEWPORT = {"width": 1280, "height": 860}


def chromium_executable() -> str | None:
    """Path of the Chromium binary to drive, or ``None`` when there is none."""
    explicit = os.environ.get("CINETUNE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser_reason() -> str | None:
    """Why the browser tests cannot run here (naming the install commands), or ``None`` when they can."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package")
    if chromium_executable() is None:
        missing.append("a Chromium binary")
    if not missing:
        return None
    return f"needs {' and '.join(missing)}: {INSTALL_HINT}"


@dataclass
class ChartWatch:
    """What ``watch_loss_chart`` saw in the page."""

    prompt_id: str | None
    points: int                      # data-points of the chart when the wait ended
    last_steps: list[int]            # distinct data-last-step values seen while waiting, in order
    readout: str                     # the chart's text line
    canvas_size: tuple[int, int]     # backing-store pixels of the chart canvas
    ink_pixels: int                  # canvas pixels that differ from the background colour
    colored_pixels: int              # strongly coloured pixels (the loss points and the EMA line)
    widgets_values: Any              # the node's widgets_values in app.graph.serialize()
    prompt_inputs: dict              # the node's inputs in app.graphToPrompt()
    widget_names: list[str]          # names of the node's widgets, in order
    other_charts: dict[str, int]     # data-points of the charts of other trainer nodes, by node id
    live_before_clear: int | None = None  # window.cinetune.lossChart.liveCount() before app.graph.clear()
    live_after_clear: int | None = None
    charts_in_dom_after_clear: int | None = None
    screenshot: Path | None = None
    console_errors: list[str] = field(default_factory=list)


# Runs in the page: the chart canvas of node `id` (found through the node's widget) and what it reports.
_READ_CHART = """(id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const widget = node?.widgets?.find((w) => w.name === "loss_chart");
    const canvas = widget?.element?.querySelector("canvas[data-cinetune-chart]");
    if (!canvas) return null;
    const readout = widget.element.querySelector(".cinetune-loss-readout");
    return {points: Number(canvas.dataset.points || 0), lastStep: canvas.dataset.lastStep ?? "",
            nodeId: canvas.dataset.nodeId ?? "", status: canvas.dataset.status ?? "",
            readout: readout?.textContent ?? "", connected: canvas.isConnected,
            cssWidth: canvas.clientWidth, cssHeight: canvas.clientHeight};
}
"""

# Runs in the page: counts canvas pixels unlike the background (the most common colour) and saturated ones.
_READ_PIXELS = """(id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const canvas = node.widgets.find((w) => w.name === "loss_chart").element.querySelector("canvas");
    const {width, height} = canvas;
    if (!width || !height) return {width, height, ink: 0, colored: 0};
    const data = canvas.getContext("2d").getImageData(0, 0, width, height).data;
    const counts = new Map();
    for (let i = 0; i < data.length; i += 4) {
        const key = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
        counts.set(key, (counts.get(key) || 0) + 1);
    }
    let bg = 0, best = -1;
    for (const [key, n] of counts) if (n > best) { best = n; bg = key; }
    const br = bg >> 16, bgG = (bg >> 8) & 255, bb = bg & 255;
    let ink = 0, colored = 0;
    for (let i = 0; i < data.length; i += 4) {
        const r = data[i], g = data[i + 1], b = data[i + 2];
        if (Math.abs(r - br) + Math.abs(g - bgG) + Math.abs(b - bb) > 30) ink++;
        if (Math.max(r, g, b) - Math.min(r, g, b) > 70) colored++;
    }
    return {width, height, ink, colored};
}
"""

_SERIALIZED = """async (id) => {
    const app = window.comfyAPI.app.app;
    const saved = app.graph.serialize().nodes.find((n) => String(n.id) === String(id));
    const prompt = await app.graphToPrompt();
    const node = app.graph.getNodeById(id);
    return {widgets_values: saved?.widgets_values ?? null,
            prompt_inputs: prompt.output[String(id)]?.inputs ?? null,
            widget_names: (node.widgets || []).map((w) => w.name)};
}
"""

_OTHER_CHARTS = """(id) => {
    const app = window.comfyAPI.app.app;
    const out = {};
    for (const node of app.graph.nodes) {
        const chart = node.widgets?.find((w) => w.name === "loss_chart");
        if (!chart || String(node.id) === String(id)) continue;
        out[String(node.id)] = Number(chart.element.querySelector("canvas").dataset.points || 0);
    }
    return out;
}
"""

_CLEAR_GRAPH = """async () => {
    const ns = window.cinetune.lossChart;
    const before = ns.liveCount();
    window.comfyAPI.app.app.graph.clear();
    await new Promise((resolve) => setTimeout(resolve, 50));
    return {before, after: ns.liveCount(),
            inDom: document.querySelectorAll("canvas[data-cinetune-chart]").length};
}
"""


def skip_first_run_ui(page, page_url: str) -> None:
    """Keep first-run UI from covering the canvas: the template browser a new user gets (server setting
    ``Comfy.TutorialCompleted``) and the "Nodes 2.0" banner (browser storage)."""
    response = page.request.post(urljoin(page_url, "api/settings/Comfy.TutorialCompleted"), data="true",
                                 headers={"Content-Type": "application/json"})
    if not response.ok:
        raise RuntimeError(f"POST /api/settings answered HTTP {response.status}: {response.text()}")
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true');")


def node_types(workflow_ui: dict) -> list[str]:
    """The registered node types a UI-format workflow uses (subgraph instances excluded)."""
    subgraphs = {s.get("id") for s in (workflow_ui.get("definitions") or {}).get("subgraphs") or []}
    types = {n.get("type") for n in workflow_ui.get("nodes") or []}
    for sub in (workflow_ui.get("definitions") or {}).get("subgraphs") or []:
        types |= {n.get("type") for n in sub.get("nodes") or []}
    return sorted(t for t in types if t and t not in subgraphs)


def wait_for_app(page, node_types: list[str], timeout_s: float) -> None:
    """Wait until the app is set up: canvas present, the chart extension loaded, and every node type the
    workflow uses registered (loading earlier reports them as missing nodes)."""
    try:
        page.wait_for_function(
            """(types) => {
                const app = window.comfyAPI?.app?.app;
                const registered = window.LiteGraph?.registered_node_types;
                return !!(app && app.vueAppReady && app.graph && app.canvas && registered
                          && document.querySelector("canvas#graph-canvas") && window.cinetune?.lossChart
                          && types.every((t) => t in registered));
            }""",
            arg=node_types, timeout=timeout_s * 1000)
    except Exception as err:
        missing = page.evaluate("""(types) => {
            const registered = window.LiteGraph?.registered_node_types || {};
            return {missing: types.filter((t) => !(t in registered)), chart: !!window.cinetune?.lossChart};
        }""", node_types)
        raise RuntimeError(f"The ComfyUI frontend was not ready within {timeout_s:.0f} s: {missing}") from err
    # Newer frontends (1.4x) restore or load their start-up workflow after the app reports ready; a workflow loaded
    # before that is replaced by it. Its nodes appearing marks the end of start-up. A frontend that starts empty
    # never shows any, so the wait is bounded and not an error.
    try:
        page.wait_for_function("() => window.comfyAPI.app.app.graph.nodes.length > 0",
                               timeout=STARTUP_GRAPH_TIMEOUT_S * 1000)
    except Exception:  # noqa: BLE001 - an empty start-up graph is fine
        pass


# Older names, kept for callers written against them.
_skip_first_run_ui, _node_types, _wait_for_app = skip_first_run_ui, node_types, wait_for_app


def watch_loss_chart(page_url: str, workflow_ui: dict, node_id: int | str, min_points: int, timeout: float, *,
                     until_step: int | None = None, screenshot_path: Path | str | None = None,
                     clear_graph: bool = True) -> ChartWatch:
    """Load ``workflow_ui`` in the frontend at ``page_url``, queue it and watch node ``node_id``'s loss chart.

    Waits (up to ``timeout`` seconds after queueing) until the chart reports at least ``min_points`` points
    and its ``data-last-step`` has increased at least once or its run has finished (and, with ``until_step``,
    reached that step). Then it reads the canvas pixels, takes a screenshot of the page with the node centred
    (to ``screenshot_path`` when given), and reads how the node is saved (``app.graph.serialize()``) and
    queued (``app.graphToPrompt()``). With ``clear_graph`` it finally clears the graph and reports how many
    charts are still listening. The prompt keeps running on the server; wait for it with ``ComfyClient``.
    ``node_id`` is a root-graph node id (nodes inside subgraphs are not supported).

    Raises ``RuntimeError`` when the frontend rejects the prompt or the page has no chart for the node,
    ``TimeoutError`` (with the chart's state and the page's console errors) when the points do not come.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    if executable is None:
        raise RuntimeError(f"No Chromium binary found: {INSTALL_HINT}")
    node_id = int(node_id)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}")
                    if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            skip_first_run_ui(page, page_url)
            page.goto(page_url, wait_until="domcontentloaded", timeout=APP_READY_TIMEOUT_S * 1000)
            wait_for_app(page, node_types(workflow_ui), APP_READY_TIMEOUT_S)
            page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", workflow_ui)
            try:
                page.wait_for_function(f"() => ({_READ_CHART})({node_id}) !== null", timeout=CHART_TIMEOUT_S * 1000)
            except PlaywrightTimeout:
                raise RuntimeError(f"Node {node_id} has no loss chart {CHART_TIMEOUT_S:.0f} s after loading the "
                                   f"workflow; page errors: {errors}") from None

            with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                      timeout=30_000) as queued:
                page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
            response = queued.value
            body = response.json()
            if response.status != 200 or body.get("node_errors"):
                raise RuntimeError(f"The frontend's prompt was rejected (HTTP {response.status}): {body}")
            prompt_id = body.get("prompt_id")

            deadline = time.monotonic() + timeout
            last_steps: list[int] = []
            state = None
            while True:
                state = page.evaluate(_READ_CHART, node_id)
                if state and state["lastStep"] != "":
                    step = int(state["lastStep"])
                    if not last_steps or step != last_steps[-1]:
                        last_steps.append(step)
                # A run that ends between two polls cannot show an increase; its "finished" status stands in.
                increased = (len(last_steps) >= 2 and last_steps[-1] > last_steps[0]) or (
                    bool(state) and state["status"] == "finished")
                reached = until_step is None or (bool(last_steps) and last_steps[-1] >= until_step)
                if state and state["points"] >= min_points and increased and reached:
                    break
                if time.monotonic() > deadline:
                    goal = f"{min_points} points" + (f" and step {until_step}" if until_step is not None else "")
                    raise TimeoutError(f"The loss chart of node {node_id} did not reach {goal} within "
                                       f"{timeout:.0f} s: last state {state}, steps seen {last_steps}, "
                                       f"page errors {errors}")
                page.wait_for_timeout(100)

            page.evaluate("""(id) => {
                const app = window.comfyAPI.app.app;
                app.canvas.ds.scale = 1;
                app.canvas.centerOnNode(app.graph.getNodeById(id));
                app.canvas.setDirty(true, true);
            }""", node_id)
            page.wait_for_timeout(400)  # the DOM widget follows the canvas on the next frames
            pixels = page.evaluate(_READ_PIXELS, node_id)
            state = page.evaluate(_READ_CHART, node_id) or state
            shot = None
            if screenshot_path is not None:
                shot = Path(screenshot_path)
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot))
            saved = page.evaluate(_SERIALIZED, node_id)
            others = page.evaluate(_OTHER_CHARTS, node_id)
            watch = ChartWatch(
                prompt_id=prompt_id, points=state["points"], last_steps=last_steps, readout=state["readout"],
                canvas_size=(pixels["width"], pixels["height"]), ink_pixels=pixels["ink"],
                colored_pixels=pixels["colored"], widgets_values=saved["widgets_values"],
                prompt_inputs=saved["prompt_inputs"] or {}, widget_names=saved["widget_names"],
                other_charts=others, screenshot=shot, console_errors=errors)
            if clear_graph:
                cleared = page.evaluate(_CLEAR_GRAPH)
                page.wait_for_timeout(500)  # more events arrive for the removed node; none may throw
                watch.live_before_clear = cleared["before"]
                watch.live_after_clear = cleared["after"]
                watch.charts_in_dom_after_clear = cleared["inDom"]
            return watch
        finally:
            browser.close()


def dump(watch: ChartWatch) -> str:
    """``watch`` as indented JSON, for assertion messages."""
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in watch.__dict__.items()}
    return json.dumps(data, indent=1, default=str)


# --------------------------------------------------------------------------------------------- canvas geometry

# Runs in the page: every node's drawn rectangle (title bar included) and properties, every link's slot centres,
# the native reroutes and the groups, after one full redraw.
_GEOMETRY = """() => {
    const app = window.comfyAPI.app.app, graph = app.graph;
    app.canvas.draw(true, true);
    const nodes = graph.nodes.map((n) => ({
        id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size],
        rect: [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT],
        properties: JSON.parse(JSON.stringify(n.properties || {})),
        widgets: (n.widgets || []).map((w) => ({name: w.name, label: w.label ?? null, type: w.type,
                                                value: typeof w.value === "string" ? w.value : null})),
        inputs: (n.inputs || []).map((s, i) => ({name: s.name, link: s.link ?? null, widget: !!s.widget,
                                                 pos: s.widget ? null : [...n.getInputPos(i)]})),
        outputs: (n.outputs || []).map((s, i) => ({name: s.name, pos: [...n.getOutputPos(i)]}))}));
    const links = [];
    for (const link of graph.links.values ? graph.links.values() : Object.values(graph.links)) {
        if (!link) continue;
        const origin = graph.getNodeById(link.origin_id), target = graph.getNodeById(link.target_id);
        const index = target.inputs.findIndex((s) => s.link === link.id);
        links.push({id: link.id, origin: link.origin_id, target: link.target_id, parentId: link.parentId ?? null,
                    start: [...origin.getOutputPos(link.origin_slot)], end: [...target.getInputPos(index)]});
    }
    const reroutes = [...(graph.reroutes?.values?.() ?? [])].map((r) => ({
        id: r.id, pos: [...r.pos], parentId: r.parentId ?? null, linkIds: [...r.linkIds]}));
    const groups = graph.groups.map((g) => ({title: g.title, bounding: [...g._bounding]}));
    return {nodes, links, reroutes, groups};
}
"""

# Runs in the page: strokes each link's drawn paths (the Path2D objects the canvas kept from its last redraw: one
# per reroute stretch and one for the last stretch) on an offscreen canvas and reports the node rectangles, other
# than the link's own ends, that got ink. Links without a kept path are reported as undrawn.
_DRAWN_HITS = """(scale) => {
    const app = window.comfyAPI.app.app, graph = app.graph;
    const rects = graph.nodes.map((n) => [n.id, n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0],
                                          n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]);
    const minX = Math.min(...rects.map((r) => r[1])) - 400, minY = Math.min(...rects.map((r) => r[2])) - 600;
    const maxX = Math.max(...rects.map((r) => r[1] + r[3])) + 400;
    const maxY = Math.max(...rects.map((r) => r[2] + r[4])) + 400;
    const canvas = document.createElement("canvas");
    canvas.width = Math.ceil((maxX - minX) * scale); canvas.height = Math.ceil((maxY - minY) * scale);
    const ctx = canvas.getContext("2d", {willReadFrequently: true});
    const hits = [], undrawn = [];
    for (const link of graph.links.values ? graph.links.values() : Object.values(graph.links)) {
        if (!link) continue;
        const paths = [];
        let reroute = link.parentId !== undefined ? graph.reroutes.get(link.parentId) : undefined;
        while (reroute) { paths.push(reroute.path); reroute = graph.reroutes.get(reroute.parentId); }
        paths.push(link.path);
        if (paths.some((p) => !p)) { undrawn.push(link.id); continue; }
        ctx.setTransform(1, 0, 0, 1, 0, 0);
        ctx.clearRect(0, 0, canvas.width, canvas.height);
        ctx.setTransform(scale, 0, 0, scale, -minX * scale, -minY * scale);
        ctx.lineWidth = app.canvas.connections_width || 3;
        ctx.strokeStyle = "#000";
        for (const p of paths) ctx.stroke(p);
        for (const [id, x, y, w, h] of rects) {
            if (id === link.origin_id || id === link.target_id) continue;
            const px = Math.floor((x - minX) * scale), py = Math.floor((y - minY) * scale);
            const data = ctx.getImageData(px, py, Math.ceil(w * scale), Math.ceil(h * scale)).data;
            for (let i = 3; i < data.length; i += 4) if (data[i] > 0) { hits.push([link.id, id]); break; }
        }
    }
    return {hits, undrawn};
}
"""


@contextmanager
def open_frontend(page_url: str, viewport: dict | None = None):
    """A headless Chromium page on the ComfyUI frontend at ``page_url``, first-run UI skipped (context manager
    yielding the Playwright page; page errors collect in ``page.cinetune_errors``).

    Raises ``RuntimeError`` when no Chromium binary is found.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    if executable is None:
        raise RuntimeError(f"No Chromium binary found: {INSTALL_HINT}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True)
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT)
            page.cinetune_errors = []
            page.on("pageerror", lambda exc: page.cinetune_errors.append(f"pageerror: {exc}"))
            page.on("console", lambda msg: page.cinetune_errors.append(f"console.error: {msg.text}")
                    if msg.type == "error" else None)
            skip_first_run_ui(page, page_url)
            page.goto(page_url, wait_until="domcontentloaded", timeout=APP_READY_TIMEOUT_S * 1000)
            yield page
        finally:
            browser.close()


def load_workflow(page, workflow_ui: dict, *, dialogs: bool = False) -> None:
    """Load a UI-format workflow as the template browser does, once its node types are registered; with
    ``dialogs`` the missing-nodes and missing-models dialogs may open. Raises ``RuntimeError`` when the app is
    not ready in time."""
    wait_for_app(page, node_types(workflow_ui), APP_READY_TIMEOUT_S)
    page.evaluate("""async ([wf, dialogs]) => {
        await window.comfyAPI.app.app.loadGraphData(wf, true, true, null,
            {showMissingNodesDialog: dialogs, showMissingModelsDialog: dialogs});
    }""", [workflow_ui, dialogs])
    page.wait_for_timeout(300)  # DOM widgets settle on the next frames


def fit_graph(page, margin: float = 40.0, inset: tuple[int, int] = (70, 80)) -> None:
    """Zoom and pan the canvas so every node, group and reroute is in view (``margin`` canvas units around them,
    clear of the ``inset`` (left, top) CSS pixels that the sidebar and the top bar cover), then redraw."""
    page.evaluate("""([margin, inset]) => {
        const app = window.comfyAPI.app.app, graph = app.graph, canvas = app.canvas;
        const boxes = graph.nodes.map((n) => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                              n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        for (const g of graph.groups) boxes.push([g._bounding[0], g._bounding[1], g._bounding[0] + g._bounding[2],
                                                  g._bounding[1] + g._bounding[3]]);
        for (const r of graph.reroutes?.values?.() ?? []) boxes.push([r.pos[0], r.pos[1], r.pos[0], r.pos[1]]);
        const x0 = Math.min(...boxes.map((b) => b[0])) - margin, y0 = Math.min(...boxes.map((b) => b[1])) - margin;
        const x1 = Math.max(...boxes.map((b) => b[2])) + margin, y1 = Math.max(...boxes.map((b) => b[3])) + margin;
        const el = canvas.canvas, width = el.clientWidth - inset[0], height = el.clientHeight - inset[1];
        const scale = Math.min(width / (x1 - x0), height / (y1 - y0));
        canvas.ds.scale = scale;
        canvas.ds.offset = [inset[0] / scale - x0 + (width / scale - (x1 - x0)) / 2,
                            inset[1] / scale - y0 + (height / scale - (y1 - y0)) / 2];
        canvas.setDirty(true, true);
        canvas.draw(true, true);
    }""", [margin, list(inset)])
    page.wait_for_timeout(300)


def canvas_geometry(page) -> dict:
    """How the frontend laid out the loaded workflow: ``nodes`` (id, type, title, pos, size, drawn ``rect`` with
    the title bar, properties, widgets, socket ``inputs`` and ``outputs`` with their slot centres), ``links``
    (id, origin, target, parentId, ``start``/``end`` slot centres), native ``reroutes`` and ``groups``."""
    return page.evaluate(_GEOMETRY)


def drawn_link_hits(page, scale: float = 0.5) -> dict:
    """Rasterise the paths the canvas drew for each link (call ``fit_graph`` first so every link is drawn) and
    return ``{"hits": [[link id, node id], ...], "undrawn": [link ids]}``: the nodes, other than a link's ends,
    whose rectangle (title bar included) the stroke touches."""
    return page.evaluate(_DRAWN_HITS, scale)
