"""Fixtures for end-to-end tests in a real ComfyUI 0.3.75 server started on the CPU.

- ``comfy_host_dir``: the ComfyUI tree, provisioned by ``scripts/provision_host.py`` (downloaded once into
  the data root, outside the repository, with its requirements installed into this interpreter).
- ``comfy_layout``: the server's folders in a pytest temp folder, with this repository linked as the pack
  ``cinetune``. Model files must be in place before the server starts, so when ``tests/e2e/models.py``
  exists this fixture calls its ``populate_models(layout)`` to write the tiny test models.
- ``comfy_server`` / ``comfy_client``: one server and one client for the whole test run.

Every test in this folder is marked ``e2e`` (deselect with ``-m "not e2e"``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .comfy_host import ComfyClient, ComfyServer, HostLayout, make_layout

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))

from provision_host import provision_host  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def comfy_host_dir() -> Path:
    """The ComfyUI tree (holds ``main.py``): the provisioned 0.3.75 host, or the tree named by the environment
    variable ``CINETUNE_COMFYUI_DIR`` (e.g. a newer ComfyUI checkout whose requirements are installed in this
    interpreter), to check the pack against another host version."""
    override = os.environ.get("CINETUNE_COMFYUI_DIR")
    if override:
        tree = Path(override).expanduser().resolve()
        if not (tree / "main.py").is_file():
            raise pytest.UsageError(f"CINETUNE_COMFYUI_DIR={override!r} is not a ComfyUI tree (no main.py there)")
        return tree
    return provision_host()


@pytest.fixture(scope="session")
def comfy_layout(tmp_path_factory) -> HostLayout:
    """Folders of the shared server, with the repository as pack ``cinetune`` and the test models in place."""
    layout = make_layout(tmp_path_factory.mktemp("comfy"), {"cinetune": ROOT})
    if (HERE / "models.py").is_file():
        from .models import populate_models

        populate_models(layout)
    return layout


@pytest.fixture(scope="session")
def comfy_server(comfy_host_dir, comfy_layout):
    """One ComfyUI server for the test run (stopped at the end); its log is ``<layout.root>/comfyui.log``."""
    with ComfyServer(comfy_host_dir, comfy_layout) as server:
        yield server


@pytest.fixture(scope="session")
def comfy_client(comfy_server):
    """A client of the shared server, with its websocket open."""
    with ComfyClient(comfy_server.base_url) as client:
        yield client
