"""Drive a real ComfyUI server: folder layout, server process, HTTP/websocket client, UI→API conversion.

Used by the end-to-end tests and by ``scripts/run_demo.py``; free of pytest. The ComfyUI tree itself
comes from ``scripts/provision_host.py``.

- ``make_layout`` creates the model, custom-node, input, output, temp and user folders of one server and
  the ``extra_model_paths`` yaml that points ComfyUI at them.
- ``ComfyServer`` runs ``main.py --cpu`` on a free local port and waits until ``/object_info`` answers.
- ``ComfyClient`` queues API-format prompts, follows the websocket and reads results from ``/history``.
- ``ui_to_api`` turns a UI-format (saved/exported) workflow into an API-format prompt using ``/object_info``.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

MODEL_FOLDERS = ("checkpoints", "diffusion_models", "vae", "text_encoders", "loras", "latent_upscale_models")
STARTUP_TIMEOUT_S = 180.0


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class HostLayout:
    """The folders one ComfyUI server reads and writes, all outside the ComfyUI tree."""

    root: Path
    models: Path          # holds one subfolder per model folder name (diffusion_models, vae, ...)
    custom_nodes: Path    # holds one symlink per node pack
    output: Path
    input: Path
    temp: Path
    user: Path
    yaml_path: Path       # the extra_model_paths yaml passed to ComfyUI


def _yaml_str(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, so no yaml library is needed.
    return json.dumps(value)


def make_layout(root: Path, pack_dirs: dict[str, Path], model_folders: Iterable[str] = MODEL_FOLDERS) -> HostLayout:
    """Create the folders of a server under ``root`` and write its extra_model_paths yaml.

    ``pack_dirs`` maps a pack name to its folder; each is symlinked as ``custom_nodes/<name>``.
    ``model_folders`` are ComfyUI model folder names created under ``models/`` and listed in the yaml
    (as the default location, ahead of the ComfyUI tree's own ``models/``). Idempotent.
    Raises ``FileNotFoundError`` when a pack folder has no ``__init__.py`` and ``FileExistsError`` when
    ``custom_nodes/<name>`` exists as a real folder.
    """
    root = Path(root).resolve()
    layout = HostLayout(root=root, models=root / "models", custom_nodes=root / "custom_nodes", output=root / "output",
                        input=root / "input", temp=root / "temp", user=root / "user",
                        yaml_path=root / "extra_model_paths.yaml")
    folders = list(model_folders)
    for path in (layout.custom_nodes, layout.output, layout.input, layout.temp, layout.user,
                 *(layout.models / f for f in folders)):
        path.mkdir(parents=True, exist_ok=True)
    for name, pack in pack_dirs.items():
        pack = Path(pack).resolve()
        if not (pack / "__init__.py").is_file():
            raise FileNotFoundError(f"Node pack {name!r} at {pack} has no __init__.py; pass the pack's root folder.")
        link = layout.custom_nodes / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and link.resolve() == pack:
                continue
            if not link.is_symlink():
                raise FileExistsError(f"{link} exists and is not a symlink; remove it or use another layout root.")
            link.unlink()
        link.symlink_to(pack, target_is_directory=True)
    lines = ["cinetune_test_host:", f"  base_path: {_yaml_str(str(layout.models))}", "  is_default: true"]
    lines += [f"  {f}: {_yaml_str(f)}" for f in folders]
    lines.append(f"  custom_nodes: {_yaml_str(str(layout.custom_nodes))}")
    layout.yaml_path.write_text("\n".join(lines) + "\n")
    return layout


# ----------------------------------------------------------------------------------------------- server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 (CPU only), usable as a context manager.

    ``host_dir`` is the ComfyUI tree (holds ``main.py``); ``layout`` comes from ``make_layout``.
    ``port=None`` picks a free port. ``extra_args`` are appended to the command line. The server's
    stdout and stderr go to ``log_path`` (default ``<layout.root>/comfyui.log``). ``env`` entries are
    added to the server's environment; Hugging Face hub access is switched off unless overridden.
    """

    def __init__(self, host_dir: Path, layout: HostLayout, *, port: int | None = None, extra_args: Iterable[str] = (),
                 log_path: Path | None = None, python: str | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT_S):
        self.host_dir = Path(host_dir)
        self.layout = layout
        self.port = port
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else layout.root / "comfyui.log"
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._fixed_port = port is not None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``. Raises ``RuntimeError`` before ``start()``."""
        if self.port is None:
            raise RuntimeError("The server has no port yet: call start() first.")
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server (run with ``cwd=host_dir``)."""
        lay = self.layout
        return [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(lay.yaml_path),
            "--output-directory", str(lay.output), "--input-directory", str(lay.input),
            "--temp-directory", str(lay.temp), "--user-directory", str(lay.user),
            # Offline and self-contained: no browser, no paid-API nodes, no database file in the shared tree.
            "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]

    def start(self) -> "ComfyServer":
        """Start the server and wait until ``GET /object_info`` answers.

        Raises ``FileNotFoundError`` when ``host_dir`` has no ``main.py``, ``RuntimeError`` with the log
        tail when the process exits during start-up, ``TimeoutError`` when it does not answer in time.
        """
        if self.process is not None:
            raise RuntimeError("This server is already started; stop() it first.")
        if not (self.host_dir / "main.py").is_file():
            raise FileNotFoundError(f"{self.host_dir} has no main.py; "
                                    "run scripts/provision_host.py to create the host.")
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = free_port()
            try:
                self._launch_and_wait()
                return self
            except RuntimeError:
                # A port picked as free can be taken before ComfyUI binds it; retry with another.
                if attempt + 1 == attempts or "address already in use" not in self.log_text().lower():
                    raise
        return self

    def _launch_and_wait(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.env}
        started = time.monotonic()
        self.process = subprocess.Popen(self.command(), cwd=self.host_dir, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)
        deadline = started + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise RuntimeError(f"ComfyUI exited with code {code} during start-up "
                                   f"(log: {self.log_path}):\n{self.log_tail()}")
            if self._answers():
                self.startup_seconds = time.monotonic() - started
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer GET /object_info within {self.startup_timeout:.0f} s "
                                   f"(log: {self.log_path}):\n{self.log_tail()}")
            time.sleep(0.25)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/object_info", timeout=10) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Terminate the server (kill it when it does not exit within 20 s). Safe to call twice."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        """Everything the server has printed so far ('' before the first start)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode("utf-8", errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        """The last ``lines`` lines of the server log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------- client


class ComfyError(RuntimeError):
    """Base class of the errors a ComfyUI server reports for a prompt."""


class PromptRejected(ComfyError):
    """``POST /prompt`` answered 400: the prompt failed validation. ``error`` and ``node_errors`` hold the reply."""

    def __init__(self, error: Any, node_errors: dict):
        self.error, self.node_errors = error, node_errors
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        details = error.get("details", "") if isinstance(error, dict) else ""
        super().__init__(f"ComfyUI rejected the prompt: {message} {details}".rstrip()
                         + f"\nerror: {json.dumps(error, indent=1)}\nnode_errors: {json.dumps(node_errors, indent=1)}")


class ExecutionFailed(ComfyError):
    """A node raised while the prompt ran. ``details`` is the ``execution_error`` message data."""

    def __init__(self, prompt_id: str, details: dict, entry: dict | None = None):
        self.prompt_id, self.details, self.entry = prompt_id, details, entry
        trace = "".join(details.get("traceback") or [])
        super().__init__(f"Prompt {prompt_id} failed in node {details.get('node_id')} ({details.get('node_type')}): "
                         f"{details.get('exception_type')}: {details.get('exception_message')}\n{trace}".rstrip())


class ExecutionInterrupted(ComfyError):
    """The prompt was interrupted (``POST /interrupt``). ``details`` is the ``execution_interrupted`` data."""

    def __init__(self, prompt_id: str, details: dict, entry: dict | None = None):
        self.prompt_id, self.details, self.entry = prompt_id, details, entry
        super().__init__(f"Prompt {prompt_id} was interrupted in node {details.get('node_id')} "
                         f"({details.get('node_type')}); nodes finished before: {details.get('executed')}")


# "executing" with node None is the last message ComfyUI sends for a prompt (after storing its history).
_FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
EVENT_GRACE_S = 2.0


class ComfyClient:
    """HTTP + websocket client of one ComfyUI server (``base_url`` like ``http://127.0.0.1:8188``).

    A background thread keeps a websocket open as ``client_id`` and appends every JSON message
    (``{"type": ..., "data": ...}``) to ``events``; binary frames (latent previews) are counted in
    ``binary_frames`` and kept in ``binary_messages`` (see ``preview_images``). Results are always read from ``/history``, so a dropped websocket only slows
    ``wait`` down. Use as a context manager or call ``close()``.
    """

    def __init__(self, base_url: str, *, client_id: str | None = None, connect_timeout: float = 10.0,
                 poll_interval: float = 1.0):
        try:
            import websocket  # websocket-client; imported here so the rest of the module works without it
        except ImportError as err:
            raise ImportError("ComfyClient needs the websocket-client package: pip install websocket-client") from err

        self._websocket = websocket
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.poll_interval = poll_interval
        self.events: list[dict] = []
        self.binary_frames = 0
        self.binary_messages: list[bytes] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="comfy-websocket", daemon=True)
        self._thread.start()
        self._connected.wait(connect_timeout)

    # --- websocket

    @property
    def connected(self) -> bool:
        """Whether the websocket is open now."""
        return self._connected.is_set()

    def _listen(self) -> None:
        url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        while not self._closed.is_set():
            try:
                ws = self._websocket.create_connection(url, timeout=10)
            except Exception:
                time.sleep(0.5)
                continue
            ws.settimeout(0.5)
            self._connected.set()
            try:
                while not self._closed.is_set():
                    try:
                        message = ws.recv()
                    except self._websocket.WebSocketTimeoutException:
                        continue
                    if isinstance(message, bytes):
                        self.binary_frames += 1
                        self.binary_messages.append(message)
                        continue
                    if not message:
                        continue
                    with self._cond:
                        self.events.append(json.loads(message))
                        self._cond.notify_all()
            except Exception:
                pass  # connection lost: reconnect unless closed
            finally:
                self._connected.clear()
                ws.close()

    def close(self) -> None:
        """Stop the websocket thread."""
        self._closed.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ComfyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def events_of(self, event_type: str, prompt_id: str | None = None) -> list[dict]:
        """The ``data`` of every event of ``event_type`` seen so far (only for ``prompt_id`` when given)."""
        return [e.get("data") or {} for e in list(self.events) if e.get("type") == event_type
                and (prompt_id is None or (e.get("data") or {}).get("prompt_id") == prompt_id)]

    def preview_images(self) -> list[tuple[str, bytes]]:
        """The preview images received so far, as ``(format, encoded image)`` with format ``"JPEG"`` or ``"PNG"``.

        ComfyUI sends a preview as a binary websocket frame: a big-endian uint32 event type (1 = preview image),
        a uint32 image type (1 = JPEG, 2 = PNG), then the encoded image (server.py ``send_image``). Frames of other
        event types (previews with metadata, which this client does not ask for) are skipped.
        """
        images = []
        for message in list(self.binary_messages):
            if len(message) > 8 and struct.unpack(">I", message[:4])[0] == 1:
                kind = {1: "JPEG", 2: "PNG"}.get(struct.unpack(">I", message[4:8])[0], "unknown")
                images.append((kind, bytes(message[8:])))
        return images

    # --- HTTP

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode("utf-8", errors="replace")

    def _get_ok(self, path: str) -> Any:
        status, payload = self._request("GET", path)
        if status != 200:
            raise ComfyError(f"GET {path} answered HTTP {status}: {payload}")
        return payload

    def object_info(self) -> dict:
        """``GET /object_info``: every registered node class and its inputs/outputs. Raises ``ComfyError``."""
        return self._get_ok("/object_info")

    def history(self, prompt_id: str) -> dict | None:
        """The ``/history`` entry of ``prompt_id``, or ``None`` while it has not finished. Raises ``ComfyError``."""
        return (self._get_ok(f"/history/{prompt_id}") or {}).get(prompt_id)

    def queue(self, prompt: dict, *, extra_data: dict | None = None) -> str:
        """``POST /prompt`` as this client; returns the prompt id.

        Raises ``PromptRejected`` (with ``error`` and ``node_errors``) when validation fails, ``ComfyError``
        for any other refusal.
        """
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, payload = self._request("POST", "/prompt", body)
        if status == 400 and isinstance(payload, dict):
            raise PromptRejected(payload.get("error"), payload.get("node_errors") or {})
        if status != 200 or not isinstance(payload, dict) or "prompt_id" not in payload:
            raise ComfyError(f"POST /prompt answered HTTP {status}: {payload}")
        return payload["prompt_id"]

    def _finished_by_events(self, prompt_id: str) -> bool:
        for e in list(self.events):
            data = e.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if e.get("type") in _FINAL_EVENTS or (e.get("type") == "executing" and data.get("node") is None):
                return True
        return False

    def wait(self, prompt_id: str, timeout: float) -> dict:
        """Wait until ``prompt_id`` has finished; returns its ``/history`` entry.

        While the websocket is connected, it also waits (up to ``EVENT_GRACE_S``) for the prompt's final
        websocket message, so ``events`` holds everything the prompt sent when this returns.
        Raises ``ExecutionFailed`` (exception message and traceback of the failing node),
        ``ExecutionInterrupted``, or ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                if self.connected:
                    with self._cond:
                        self._cond.wait_for(lambda: self._finished_by_events(prompt_id), timeout=EVENT_GRACE_S)
                return self._check(prompt_id, entry)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = [e.get("type") for e in list(self.events)[-10:]]
                raise TimeoutError(f"Prompt {prompt_id} did not finish within {timeout:.0f} s "
                                   f"(last websocket events: {recent}).")
            with self._cond:
                # The websocket says when to look; polling covers a lost connection.
                finished = self._cond.wait_for(lambda: self._finished_by_events(prompt_id),
                                               timeout=min(self.poll_interval, remaining))
            if finished:
                time.sleep(0.05)  # the history entry is stored just after the final event is sent

    @staticmethod
    def _check(prompt_id: str, entry: dict) -> dict:
        for message in (entry.get("status") or {}).get("messages") or []:
            kind, data = message[0], message[1] if len(message) > 1 else {}
            if kind == "execution_error":
                raise ExecutionFailed(prompt_id, data, entry)
            if kind == "execution_interrupted":
                raise ExecutionInterrupted(prompt_id, data, entry)
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            raise ExecutionFailed(prompt_id, {"exception_message": f"status {status}"}, entry)
        return entry

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue ``prompt`` and wait for it; returns the history entry. Raises as ``queue`` and ``wait``."""
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop the running prompt (only if it is ``prompt_id``, when given).
        Raises ``ComfyError`` when the server refuses."""
        status, payload = self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ComfyError(f"POST /interrupt answered HTTP {status}: {payload}")

    @staticmethod
    def output_files(history_entry: dict, output_dir: Path) -> list[Path]:
        """Paths of the files a finished prompt reported in its outputs (entries with ``filename``,
        ``subfolder`` and ``type == "output"``), resolved against ``output_dir``."""
        paths = []
        for node_output in (history_entry.get("outputs") or {}).values():
            for items in node_output.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                        paths.append(Path(output_dir) / (item.get("subfolder") or "") / item["filename"])
        return paths


# ----------------------------------------------------------------------------------------------- UI → API

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UI_ONLY_NODES = frozenset({"Note", "MarkdownNote"})
RESOLVED_NODES = frozenset({"Reroute", "PrimitiveNode"})  # frontend-only nodes whose links are followed through
MODE_MUTED, MODE_BYPASS = 2, 4
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload", "animated_image_upload")
# Before ``control_after_generate`` existed, the frontend gave these INT widgets a control widget by name.
LEGACY_SEED_NAMES = frozenset({"seed", "noise_seed"})


def _is_widget(spec: list) -> bool:
    kind = spec[0] if spec else None
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES or opts.get("widgetType") in WIDGET_TYPES


def _widget_inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of the node's widget inputs in the order the frontend creates them."""
    inputs, order = info.get("input") or {}, info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            spec = specs.get(name)
            if spec and _is_widget(spec):
                kind = "COMBO" if isinstance(spec[0], list) else spec[0]
                out.append((name, kind, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def _assign_widgets(node: dict, info: dict) -> dict:
    values = node.get("widgets_values")
    widgets = _widget_inputs(info)
    if isinstance(values, dict):  # some packs save widgets by name
        return {name: values[name] for name, _, _ in widgets if name in values}
    values, out, i = list(values or []), {}, 0
    for name, kind, opts in widgets:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        has_control = opts.get("control_after_generate") or (kind == "INT" and name in LEGACY_SEED_NAMES)
        if has_control and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
        if any(opts.get(flag) for flag in UPLOAD_FLAGS) and i < len(values) and isinstance(values[i], str):
            i += 1  # the upload button widget stores a value of its own
    return out


def _links_by_id(workflow: dict) -> dict[int, tuple[int, int]]:
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    return links


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (``nodes``/``links``, positional ``widgets_values``) to an API prompt.

    Widget values are matched to the node's widget inputs in ``input_order`` (required, then optional),
    skipping socket-only inputs, control_after_generate values and upload-button values. Linked inputs
    become ``[str(source_id), slot]``; Reroute nodes are followed, PrimitiveNode values are inlined,
    bypassed nodes (mode 4) pass a matching input through, muted nodes (mode 2) and notes are dropped.
    Raises ``ValueError`` for a node type that the server does not know (missing pack, subgraph).
    """
    nodes = {n["id"]: n for n in workflow.get("nodes") or []}
    links = _links_by_id(workflow)
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}

    def input_link(node: dict, index: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[index].get("link") if index < len(inputs) else None

    def resolve(link_id: int | None, seen: frozenset = frozenset()) -> Any:
        """The API value of a link: ``[src, slot]``, a primitive's value, or ``None`` when nothing feeds it."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        src_id, slot = links[link_id]
        src, seen = nodes.get(src_id), seen | {link_id}
        if src is None or src.get("mode") == MODE_MUTED:
            return None
        kind = src.get("type")
        if kind == "Reroute":
            return resolve(input_link(src, 0), seen)
        if kind == "PrimitiveNode":
            values = src.get("widgets_values") or []
            return {"value": values[0]} if values else None
        if src.get("mode") == MODE_BYPASS:
            out_type = ((src.get("outputs") or [])[slot:slot + 1] or [{}])[0].get("type")
            inputs = src.get("inputs") or []
            order = ([slot] if slot < len(inputs) else []) + list(range(len(inputs)))
            for index in order:
                if inputs[index].get("type") == out_type and inputs[index].get("link") is not None:
                    return resolve(inputs[index]["link"], seen)
            return None
        return [str(src_id), slot]

    prompt = {}
    for node_id, node in nodes.items():
        kind = node.get("type")
        if kind in UI_ONLY_NODES or kind in RESOLVED_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            if kind in subgraphs:
                raise ValueError(f"Node {node_id} is a subgraph ({kind}); "
                                 "unpack the subgraph in ComfyUI and save the workflow again.")
            raise ValueError(f"Node {node_id} has type {kind!r}, which this ComfyUI server does not know. "
                             "Install the node pack that provides it, or check the server log for import errors.")
        inputs = _assign_widgets(node, info)
        for index, slot in enumerate(node.get("inputs") or []):
            if slot.get("link") is None:
                continue
            value = resolve(slot["link"])
            if isinstance(value, dict):
                inputs[slot["name"]] = value["value"]
            elif value is not None:
                inputs[slot["name"]] = value
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return prompt
