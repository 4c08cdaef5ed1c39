"""The trainer node's live loss chart (``web/js/loss_chart.js``) in the real ComfyUI frontend.

A ComfyUI server runs a throwaway pack whose only node has the trainer's id, ``CinetuneK5TrainLoRA``: it loops
over steps, checks for interruption and sends the trainer's websocket events (``cinetune.train.progress`` per
step with loss parts, gradient norm, a validation loss every quarter and checkpoint paths;
``cinetune.train.status`` for started/validation/finished/interrupted, "finished" carrying the LoRA's path). The
repository pack is not loaded, so the ids do not clash; the throwaway pack serves the repository's ``web`` folder
as its WEB_DIRECTORY. Headless Chromium (Playwright) loads a UI-format workflow, queues it and watches the chart
through ``browser.watch_loss_chart``, or drives the page itself to read the chart's axes, legend, markers and
readout, use its toggles and resize the node.

Skipped only when Chromium or the playwright package is missing.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path

import pytest

from .browser import (CHROMIUM_ARGS, VIEWPORT, chromium_executable, dump, missing_browser_reason, node_types,
                      skip_first_run_ui, wait_for_app, watch_loss_chart)
from .comfy_host import ComfyClient, ComfyServer, make_layout

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(missing_browser_reason() is not None,
                                                  reason=missing_browser_reason() or "")]

ROOT = Path(__file__).resolve().parents[2]
NODE_ID = "CinetuneK5TrainLoRA"

PACK_SOURCE = textwrap.dedent('''
    import math
    import os
    import time

    import comfy.model_management
    import folder_paths
    import server
    from comfy_api.latest import ComfyExtension, io
    from comfy_execution.utils import get_executing_context

    # The repository's frontend folder (holds the chart extension), served as this pack's own.
    WEB_DIRECTORY = os.environ["CINETUNE_CHART_TEST_WEB"]


    class StandInTrainer(io.ComfyNode):
        """Sends the trainer's websocket events for a made-up loss curve."""

        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="CinetuneK5TrainLoRA", display_name="Stand-in trainer", category="Cinetune/test",
                inputs=[io.Int.Input("steps", default=40, min=1, max=100000),
                        io.Float.Input("delay", default=0.15, min=0.0, max=10.0),
                        io.String.Input("run", default="run")],
                outputs=[io.Int.Output(display_name="steps_done")],
                hidden=[io.Hidden.unique_id], is_output_node=True)

        @classmethod
        def execute(cls, steps, delay, run):
            instance = server.PromptServer.instance
            node, prompt_id = str(cls.hidden.unique_id), get_executing_context().prompt_id
            base = {"node": node, "prompt_id": prompt_id, "run": run}

            def status(kind, step, message):
                instance.send_sync("cinetune.train.status", {**base, "status": kind, "step": step, "message": message})

            status("started", 0, f"training {steps} steps")
            loras = folder_paths.get_folder_paths("loras")[0]
            ema, started = None, time.monotonic()
            for step in range(1, steps + 1):
                try:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                except BaseException:
                    status("interrupted", step - 1, "interrupted")
                    raise
                time.sleep(delay)
                loss = 0.2 + 0.8 * math.exp(-step / (0.3 * steps)) + 0.05 * math.sin(step * 1.7)
                ema = loss if ema is None else 0.9 * ema + 0.1 * loss
                rate = step / max(time.monotonic() - started, 1e-6)
                quarter = step % max(1, steps // 4) == 0
                checkpoint = step in (steps // 2, steps)
                instance.send_sync("cinetune.train.progress", {
                    **base, "step": step, "max_steps": steps, "loss": loss, "loss_ema": ema,
                    "lr": 1e-4 * min(1.0, step / 5), "steps_per_s": rate, "eta_s": (steps - step) / rate,
                    "epoch": 1 + step // 10, "loss_terms": {"video": 0.7 * loss, "audio": 0.3 * loss},
                    "grad_norm": 0.5 + 0.1 * math.cos(step),
                    "validation_loss": 0.9 * ema + 0.05 if quarter else None,
                    "checkpoint": os.path.join(loras, "runs", run, f"step_{step:06d}.safetensors") if checkpoint
                    else None})
                if step == steps // 2:
                    status("validation", step, os.path.join(loras, "runs", run, f"validation_{step:06d}.mp4"))
            status("finished", steps, os.path.join(loras, f"{run}_trained_lora.safetensors"))
            return io.NodeOutput(steps)


    class StandInExtension(ComfyExtension):
        async def get_node_list(self):
            return [StandInTrainer]


    async def comfy_entrypoint():
        return StandInExtension()
''')


@pytest.fixture(scope="module")
def chart_host(comfy_host_dir, tmp_path_factory):
    """A server with only the stand-in pack (serving the repository's ``web`` folder) and a client of it."""
    pack = tmp_path_factory.mktemp("chart_pack")
    (pack / "__init__.py").write_text(PACK_SOURCE)
    layout = make_layout(tmp_path_factory.mktemp("chart_host"), {"cinetune_chart_test": pack})
    server = ComfyServer(comfy_host_dir, layout, env={"CINETUNE_CHART_TEST_WEB": str(ROOT / "web")})
    with server, ComfyClient(server.base_url) as client:
        yield server, client


def _workflow(steps: int, delay: float, run: str) -> dict:
    """A UI-format workflow: trainer node 1 runs; trainer node 2 is muted and must stay empty."""
    def node(nid, widgets, pos, mode=0):
        return {"id": nid, "type": NODE_ID, "pos": pos, "size": [520, 360], "flags": {}, "order": nid - 1,
                "mode": mode, "inputs": [], "outputs": [{"name": "steps_done", "type": "INT", "links": []}],
                "properties": {"Node name for S&R": NODE_ID}, "widgets_values": widgets}

    return {"last_node_id": 2, "last_link_id": 0, "version": 0.4, "groups": [], "config": {}, "links": [],
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "nodes": [node(1, [steps, delay, run], [60, 60]), node(2, [5, 0.0, "muted"], [640, 60], mode=2)]}


def test_chart_draws_live_loss_and_is_not_saved(chart_host, tmp_path):
    server, client = chart_host
    steps = 40
    shot = tmp_path / "loss_chart.png"
    watch = watch_loss_chart(server.base_url + "/", _workflow(steps, 0.15, "run-a"), node_id=1,
                             min_points=steps // 2, timeout=40, screenshot_path=shot)
    info = dump(watch)
    assert watch.points >= steps // 2, info
    assert watch.last_steps == sorted(watch.last_steps) and watch.last_steps[-1] > watch.last_steps[0], info
    assert f"/{steps}" in watch.readout and "loss" in watch.readout and "it/s" in watch.readout, info
    # The canvas has content beyond its background, and coloured content (loss points, EMA line).
    width, height = watch.canvas_size
    assert width >= 200 and height >= 100, info
    assert watch.ink_pixels > 500 and watch.colored_pixels > 100, info
    assert shot.is_file() and shot.stat().st_size > 10_000, info
    # Only the node that sent events has points; the muted trainer's chart stays empty.
    assert watch.other_charts == {"2": 0}, info
    # The chart is a widget, but neither the saved workflow nor the queued prompt carries a value for it.
    assert "loss_chart" in watch.widget_names, info
    assert watch.widgets_values == [steps, 0.15, "run-a"], info
    assert set(watch.prompt_inputs) == {"steps", "delay", "run"}, info
    # Clearing the graph removes the chart and its listeners; later events for the node do not raise.
    assert watch.live_before_clear == 2 and watch.live_after_clear == 0, info
    assert watch.charts_in_dom_after_clear == 0, info
    assert not [e for e in watch.console_errors if "loss_chart" in e or "pageerror" in e], info

    client.wait(watch.prompt_id, timeout=30)
    progress = [d for d in client.events_of("cinetune.train.progress", watch.prompt_id) if d["node"] == "1"]
    assert [d["step"] for d in progress] == list(range(1, steps + 1))
    kinds = [d["status"] for d in client.events_of("cinetune.train.status", watch.prompt_id)]
    assert kinds == ["started", "validation", "finished"]


def test_chart_keeps_at_most_max_points_of_a_long_run(chart_host):
    server, client = chart_host
    steps = 12_000  # more than twice the 5000-point cap, sent as fast as the server can
    watch = watch_loss_chart(server.base_url + "/", _workflow(steps, 0.0, "run-long"), node_id=1,
                             min_points=1, until_step=steps, timeout=60, clear_graph=False)
    info = dump(watch)
    assert watch.last_steps[-1] == steps, info
    # Two halvings: 12000 steps end up in buckets of 4 steps, about 3000 points; never above the cap.
    assert 1000 < watch.points <= 5000, info
    assert math.isclose(watch.points, steps / 4, rel_tol=0.2), info
    assert watch.colored_pixels > 100, info
    client.wait(watch.prompt_id, timeout=30)


# Runs in the page: everything the chart of node `id` shows, read from its DOM and canvas data attributes.
_CHART_STATE = """(id) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    const element = node.widgets.find((w) => w.name === "loss_chart").element;
    const canvas = element.querySelector("canvas[data-cinetune-chart]");
    const readout = element.querySelector(".cinetune-loss-readout");
    const lines = [...readout.querySelectorAll(".cinetune-loss-line")];
    const lora = readout.querySelector(".cinetune-loss-lora");
    const d = canvas.dataset;
    return {status: d.status || "", lastStep: d.lastStep === "" ? null : Number(d.lastStep),
            axisTitles: d.axisTitles || "", xTicks: d.xTicks || "", yTicks: d.yTicks || "", xRange: d.xRange || "",
            logY: d.logY || "", fullRun: d.fullRun || "", terms: d.terms || "",
            checkpoints: Number(d.checkpoints || 0), validations: Number(d.validations || 0),
            legend: [...element.querySelectorAll(".cinetune-loss-legend [data-series]")].map((e) => e.dataset.series),
            lines: lines.map((e) => e.textContent), lastLineIsLora: lines.length > 0 && lines[lines.length - 1] === lora,
            loraHeight: lora ? lora.getBoundingClientRect().height : 0,
            lineHeight: parseFloat(getComputedStyle(readout).lineHeight),
            readoutOverflow: readout.scrollWidth - readout.clientWidth,
            canvasHeight: canvas.clientHeight, canvasWidth: canvas.clientWidth,
            properties: node.properties ?? {}};
}
"""

_CLICK_TOGGLE = """([id, label]) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    const element = node.widgets.find((w) => w.name === "loss_chart").element;
    [...element.querySelectorAll("button.cinetune-loss-toggle")].find((b) => b.textContent === label).click();
}
"""

_RESIZE = """([id, width, height]) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    node.setSize([width, height]);
    app.canvas.setDirty(true, true);
}
"""


def _numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _is_nice(value: float, fractions=(1.0, 2.0, 2.5, 5.0)) -> bool:
    """value = f·10^k with f one of ``fractions`` (up to float rounding)."""
    if value <= 0:
        return False
    exponent = math.floor(math.log10(value) + 1e-9)
    return any(math.isclose(value / 10 ** exponent, f, rel_tol=1e-6) for f in fractions)


def _assert_nice_linear(ticks: list[float], integer: bool) -> None:
    assert len(ticks) >= 2, ticks
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1, ticks
    step = steps.pop()
    assert _is_nice(step, (1.0, 2.0, 5.0) if integer else (1.0, 2.0, 2.5, 5.0)), ticks
    assert all(math.isclose(t / step, round(t / step), abs_tol=1e-6) for t in ticks), ticks
    if integer:
        assert all(float(t).is_integer() for t in ticks), ticks


class _ChartPage:
    """One Chromium page on the chart server's frontend (Playwright's sync API), closed with the context."""

    def __init__(self, base_url: str):
        self.base_url = base_url + "/"
        self.errors: list[str] = []

    def __enter__(self) -> "_ChartPage":
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=chromium_executable(), args=list(CHROMIUM_ARGS),
                                                 headless=True)
        self.page = self._browser.new_page(viewport=VIEWPORT)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", lambda msg: self.errors.append(f"console.error: {msg.text}")
                     if msg.type == "error" else None)
        return self

    def __exit__(self, *exc) -> None:
        self._browser.close()
        self._pw.stop()

    def load(self, workflow: dict) -> None:
        skip_first_run_ui(self.page, self.base_url)
        self.page.goto(self.base_url, wait_until="domcontentloaded", timeout=60_000)
        wait_for_app(self.page, node_types(workflow), 60)
        self.page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", workflow)

    def queue(self) -> str:
        with self.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                       timeout=30_000) as queued:
            self.page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
        body = queued.value.json()
        assert queued.value.status == 200 and not body.get("node_errors"), body
        return body["prompt_id"]

    def state(self, node_id: int) -> dict:
        self.page.wait_for_timeout(150)  # redraws happen on the next animation frame
        return self.page.evaluate(_CHART_STATE, node_id)

    def wait_for(self, node_id: int, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.page.evaluate(_CHART_STATE, node_id)
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"chart never showed {what} within {timeout:.0f} s: {state}; {self.errors}")
            self.page.wait_for_timeout(50)


def test_chart_is_readable_and_ends_with_the_lora_path(chart_host, tmp_path):
    server, client = chart_host
    steps = 40
    workflow = _workflow(steps, 0.12, "run-readable")
    with _ChartPage(server.base_url) as chart:
        chart.load(workflow)
        prompt_id = chart.queue()

        # Mid-run the x axis follows the run; "full run" spans all max_steps.
        early = chart.wait_for(1, lambda s: s["lastStep"] is not None and steps // 4 <= s["lastStep"] < steps // 2,
                               30, "a step in the second quarter")
        x_min, x_max = _numbers(early["xRange"])
        assert x_min == 0 and early["lastStep"] <= x_max < steps, early
        chart.page.evaluate(_CLICK_TOGGLE, [1, "full run"])
        full = chart.state(1)
        assert full["fullRun"] == "on" and _numbers(full["xRange"]) == [0, steps], full
        chart.page.evaluate(_CLICK_TOGGLE, [1, "full run"])

        done = chart.wait_for(1, lambda s: s["status"] == "finished", 30, "the finished run")
        client.wait(prompt_id, timeout=30)
        info = json.dumps(done, indent=1)
        assert done["axisTitles"] == "step,loss", info
        assert done["legend"][:3] == ["raw", "smoothed", "validation"], info
        assert {"video", "audio", "checkpoint"} <= set(done["legend"]) and done["terms"] == "video,audio", info
        _assert_nice_linear(_numbers(done["xTicks"]), integer=True)
        _assert_nice_linear(_numbers(done["yTicks"]), integer=False)
        # Markers: checkpoints at steps 20 and 40; validation losses every 10 steps and the clip at step 20.
        assert done["checkpoints"] == 2 and done["validations"] == 4, info
        lines = done["lines"]
        assert lines[0].startswith(f"step {steps}/{steps}") and "smoothed" in lines[0] and "audio" in lines[0], info
        assert "grad norm" in lines[1] and "it/s" in lines[1], info
        assert any(line.startswith("validation loss") for line in lines), info
        assert done["lastLineIsLora"] and lines[-1].startswith("LoRA: "), info
        assert lines[-1].endswith("run-readable_trained_lora.safetensors"), info

        # The readout wraps instead of cutting off: at the minimum width the long path takes several lines.
        chart.page.evaluate(_RESIZE, [1, 420, 420])
        narrow = chart.state(1)
        assert narrow["readoutOverflow"] <= 1, narrow
        assert narrow["loraHeight"] >= 2 * narrow["lineHeight"] - 1, narrow
        # The chart grows with the node.
        chart.page.evaluate(_RESIZE, [1, 900, 820])
        large = chart.state(1)
        assert large["canvasHeight"] > narrow["canvasHeight"] + 200, (narrow, large)
        assert large["canvasWidth"] > narrow["canvasWidth"] + 300, (narrow, large)

        # Log y: ticks at 1, 2, 5 × 10^k; the choice is stored in the node's properties, not in its widgets.
        chart.page.evaluate(_CLICK_TOGGLE, [1, "log y"])
        logged = chart.state(1)
        assert logged["logY"] == "on" and logged["properties"].get("cinetune_chart_log_y") is True, logged
        assert all(_is_nice(t, (1.0, 2.0, 5.0)) for t in _numbers(logged["yTicks"])), logged
        saved = chart.page.evaluate("""() => window.comfyAPI.app.app.graph.serialize().nodes
            .find((n) => n.id === 1)""")
        assert saved["widgets_values"] == [steps, 0.12, "run-readable"], saved
        assert saved["properties"].get("cinetune_chart_log_y") is True, saved
        chart.page.screenshot(path=str(tmp_path / "readable_chart.png"))
        assert not [e for e in chart.errors if "loss_chart" in e or "chart_scale" in e or "pageerror" in e], \
            chart.errors
