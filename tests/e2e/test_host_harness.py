"""The end-to-end harness itself, proven on a throwaway V3 pack in a real ComfyUI server.

The pack (written to a temp folder) has two nodes: one writes a text file into the output folder and
reports it, the other loops with a short sleep per step, checking for interruption, reporting progress
and sending a custom websocket event every step. The last tests check ``ui_to_api`` offline.
"""

from __future__ import annotations

import textwrap
import time

import pytest

from .comfy_host import (ComfyClient, ComfyServer, ExecutionFailed, ExecutionInterrupted, PromptRejected,
                         make_layout, ui_to_api)

pytestmark = pytest.mark.e2e

PACK_SOURCE = textwrap.dedent('''
    import os
    import time

    import comfy.model_management
    import comfy.utils
    import folder_paths
    import server
    from comfy_api.latest import ComfyExtension, io


    class HarnessWriteText(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="HarnessWriteText", display_name="Harness Write Text", category="harness",
                inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True),
                        io.String.Input("text", default="hello")],
                outputs=[io.String.Output(display_name="path")], is_output_node=True)

        @classmethod
        def execute(cls, seed, text):
            if text.startswith("fail"):
                raise ValueError(f"harness failure requested by text {text!r}")
            name = f"harness_{seed}.txt"
            path = os.path.join(folder_paths.get_output_directory(), name)
            with open(path, "w") as handle:
                handle.write(f"{text}|{seed}")
            return io.NodeOutput(path, ui={"text": [f"{text}|{seed}"],
                                           "files": [{"filename": name, "subfolder": "", "type": "output"}]})


    class HarnessLoop(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="HarnessLoop", display_name="Harness Loop", category="harness",
                inputs=[io.Int.Input("steps", default=10, min=1, max=10000),
                        io.Float.Input("delay", default=0.2, min=0.0, max=10.0),
                        io.String.Input("tag", default="loop"),
                        io.String.Input("after", optional=True, force_input=True)],
                outputs=[io.Int.Output(display_name="ticks")], is_output_node=True)

        @classmethod
        def execute(cls, steps, delay, tag, after=None):
            bar = comfy.utils.ProgressBar(steps)
            for step in range(1, steps + 1):
                comfy.model_management.throw_exception_if_processing_interrupted()
                time.sleep(delay)
                bar.update(1)
                server.PromptServer.instance.send_sync(
                    "harness.tick", {"tag": tag, "step": step, "steps": steps, "after": after})
            return io.NodeOutput(steps, ui={"text": [f"{tag}: {steps} steps"]})


    class HarnessExtension(ComfyExtension):
        async def get_node_list(self):
            return [HarnessWriteText, HarnessLoop]


    async def comfy_entrypoint():
        return HarnessExtension()
''')


@pytest.fixture(scope="module")
def harness(comfy_host_dir, tmp_path_factory):
    """A server with only the throwaway pack, and a client of it."""
    pack = tmp_path_factory.mktemp("harness_pack")
    (pack / "__init__.py").write_text(PACK_SOURCE)
    layout = make_layout(tmp_path_factory.mktemp("harness_host"), {"harness_pack": pack})
    with ComfyServer(comfy_host_dir, layout) as server:
        print(f"ComfyUI started in {server.startup_seconds:.1f} s")
        with ComfyClient(server.base_url) as client:
            yield server, client, layout


def _ticks(client: ComfyClient, tag: str) -> list[int]:
    return [data["step"] for data in client.events_of("harness.tick") if data["tag"] == tag]


def test_server_lists_both_nodes_with_widget_order(harness):
    server, client, _ = harness
    info = client.object_info()
    assert info["HarnessWriteText"]["input_order"]["required"] == ["seed", "text"]
    order = info["HarnessLoop"]["input_order"]
    assert (order["required"], order["optional"]) == (["steps", "delay", "tag"], ["after"])
    assert info["HarnessWriteText"]["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert "harness_pack" in info["HarnessLoop"]["python_module"]
    assert "Starting server" in server.log_text()


def test_api_prompt_writes_its_output_file(harness):
    _, client, layout = harness
    entry = client.run({"1": {"class_type": "HarnessWriteText", "inputs": {"seed": 11, "text": "api"}}}, timeout=60)
    files = client.output_files(entry, layout.output)
    assert files == [layout.output / "harness_11.txt"]
    assert files[0].read_text() == "api|11"
    assert entry["outputs"]["1"]["text"] == ["api|11"]


def _ui_workflow(seed: int) -> dict:
    def node(nid, kind, widgets, inputs=(), outputs=(), mode=0):
        return {"id": nid, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": nid, "mode": mode,
                "inputs": list(inputs), "outputs": list(outputs), "properties": {}, "widgets_values": widgets}

    return {
        "last_node_id": 5, "last_link_id": 2, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "nodes": [
            node(1, "HarnessWriteText", [seed, "randomize", "from ui"],
                 outputs=[{"name": "path", "type": "STRING", "links": [1], "slot_index": 0}]),
            node(2, "Reroute", None, inputs=[{"name": "", "type": "*", "link": 1}],
                 outputs=[{"name": "", "type": "STRING", "links": [2]}]),
            node(3, "HarnessLoop", [2, 0.01, "ui"], inputs=[{"name": "after", "type": "STRING", "link": 2}],
                 outputs=[{"name": "ticks", "type": "INT", "links": []}]),
            node(4, "Note", ["A note is UI only."]),
            node(5, "HarnessWriteText", [99, "fixed", "muted"], mode=2),
        ],
        "links": [[1, 1, 0, 2, 0, "STRING"], [2, 2, 0, 3, 0, "STRING"]],
    }


def test_ui_workflow_converts_and_runs(harness):
    _, client, layout = harness
    prompt = ui_to_api(_ui_workflow(seed=21), client.object_info())
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == {
        "1": ("HarnessWriteText", {"seed": 21, "text": "from ui"}),
        "3": ("HarnessLoop", {"steps": 2, "delay": 0.01, "tag": "ui", "after": ["1", 0]}),
    }
    entry = client.run(prompt, timeout=60)
    assert (layout.output / "harness_21.txt").read_text() == "from ui|21"
    assert _ticks(client, "ui") == [1, 2]
    ticks = [data for data in client.events_of("harness.tick") if data["tag"] == "ui"]
    assert ticks[0]["after"] == str(layout.output / "harness_21.txt")
    assert entry["outputs"]["3"]["text"] == ["ui: 2 steps"]


def test_interrupt_stops_the_loop_within_two_steps(harness):
    _, client, _ = harness
    steps = 50
    loop = {"class_type": "HarnessLoop", "inputs": {"steps": steps, "delay": 0.2, "tag": "stop"}}
    prompt_id = client.queue({"1": loop})
    deadline = time.monotonic() + 30
    while len(_ticks(client, "stop")) < 2:
        assert time.monotonic() < deadline, "the loop never reported two ticks"
        time.sleep(0.02)
    at_interrupt = max(_ticks(client, "stop"))
    client.interrupt()
    with pytest.raises(ExecutionInterrupted) as err:
        client.wait(prompt_id, timeout=30)
    assert err.value.details["node_type"] == "HarnessLoop"
    final = max(_ticks(client, "stop"))
    assert final < steps and final - at_interrupt <= 2
    assert client.events_of("execution_interrupted", prompt_id)
    progress = client.events_of("progress", prompt_id)
    assert progress and progress[0]["max"] == steps and progress[0]["node"] == "1"


def test_node_exception_is_raised_with_message_and_traceback(harness):
    _, client, _ = harness
    with pytest.raises(ExecutionFailed) as err:
        client.run({"1": {"class_type": "HarnessWriteText", "inputs": {"seed": 31, "text": "fail now"}}}, timeout=60)
    message = str(err.value)
    assert "harness failure requested by text 'fail now'" in message
    assert "HarnessWriteText" in message and "in execute" in message  # the node's traceback is included
    assert err.value.details["exception_type"] == "ValueError"
    assert client.object_info()  # the server keeps answering


def test_invalid_prompt_is_rejected_with_node_errors(harness):
    _, client, _ = harness
    with pytest.raises(PromptRejected) as err:
        client.queue({"7": {"class_type": "HarnessWriteText", "inputs": {"seed": 1}}})
    assert "7" in err.value.node_errors
    assert "text" in str(err.value) and "required_input_missing" in str(err.value)


def test_server_that_dies_at_start_reports_its_log(comfy_host_dir, tmp_path):
    layout = make_layout(tmp_path, {})
    server = ComfyServer(comfy_host_dir, layout, extra_args=["--no-such-option"])
    with pytest.raises(RuntimeError, match="(?s)exited with code 2.*unrecognized arguments: --no-such-option"):
        server.start()
    assert server.process is None


# --- ui_to_api without a server ---------------------------------------------------------------------------

OBJECT_INFO = {
    "Src": {"input": {"required": {"seed": ["INT", {}], "name": [["a.png", "b.png"], {"image_upload": True}],
                                   "mode": [["x", "y"], {}]}},
            "input_order": {"required": ["seed", "name", "mode"]}, "display_name": "Source"},
    "Pass": {"input": {"required": {"image": ["IMAGE", {}], "strength": ["FLOAT", {}]},
                       "optional": {"label": ["STRING", {"forceInput": True}], "note": ["STRING", {}]}},
             "input_order": {"required": ["image", "strength"], "optional": ["label", "note"]}},
}


def _node(nid, kind, widgets=None, inputs=(), outputs=(), mode=0):
    return {"id": nid, "type": kind, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "widgets_values": widgets}


def test_ui_to_api_handles_legacy_seed_upload_bypass_and_primitives():
    workflow = {
        "nodes": [
            _node(1, "Src", [5, "increment", "b.png", "image", "y"], outputs=[{"type": "IMAGE"}]),
            _node(2, "Pass", [0.5, "n2"], inputs=[{"name": "image", "type": "IMAGE", "link": 1}],
                  outputs=[{"type": "IMAGE"}], mode=4),
            _node(3, "Pass", [0.7, "n3"], inputs=[{"name": "image", "type": "IMAGE", "link": 2},
                                                 {"name": "label", "type": "STRING", "link": 3},
                                                 {"name": "strength", "type": "FLOAT", "link": 4,
                                                  "widget": {"name": "strength"}}]),
            _node(4, "PrimitiveNode", ["from primitive"], outputs=[{"type": "STRING"}]),
            _node(5, "PrimitiveNode", [0.25, "fixed"], outputs=[{"type": "FLOAT"}]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"],
                  {"id": 3, "origin_id": 4, "origin_slot": 0, "target_id": 3, "target_slot": 1, "type": "STRING"},
                  [4, 5, 0, 3, 2, "FLOAT"]],
    }
    prompt = ui_to_api(workflow, OBJECT_INFO)
    assert prompt == {
        "1": {"class_type": "Src", "inputs": {"seed": 5, "name": "b.png", "mode": "y"}, "_meta": {"title": "Source"}},
        "3": {"class_type": "Pass", "inputs": {"image": ["1", 0], "strength": 0.25, "label": "from primitive",
                                                "note": "n3"}, "_meta": {"title": "Pass"}},
    }


def test_ui_to_api_names_unknown_node_types():
    with pytest.raises(ValueError, match="'Missing'.*does not know"):
        ui_to_api({"nodes": [_node(1, "Missing", [])], "links": []}, OBJECT_INFO)
