"""The trainer node's live loss chart (``web/js/loss_chart.js``) in the real ComfyUI frontend.

A ComfyUI server runs a throwaway pack whose only node has the trainer's id, ``CinetuneK5TrainLoRA``: it loops
over steps, checks for interruption and sends the trainer's websocket events (``cinetune.train.progress`` per
step, ``cinetune.train.status`` for started/checkpoint/finished/interrupted). The repository pack is not
loaded, so the ids do not clash; the throwaway pack serves the repository's ``web`` folder as its
WEB_DIRECTORY. Headless Chromium (Playwright) loads a UI-format workflow, queues it and watches the chart
through ``browser.watch_loss_chart``.

Skipped only when Chromium or the playwright package is missing.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from .browser import dump, missing_browser_reason, watch_loss_chart
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
                instance.send_sync("cinetune.train.progress", {
                    **base, "step": step, "max_steps": steps, "loss": loss, "loss_ema": ema,
                    "lr": 1e-4 * min(1.0, step / 5), "steps_per_s": rate, "eta_s": (steps - step) / rate})
                if step == steps // 2:
                    status("checkpoint", step, f"saved step {step}")
            status("finished", steps, "done")
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
    assert kinds == ["started", "checkpoint", "finished"]


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
