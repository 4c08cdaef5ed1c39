"""End-to-end tests in a real ComfyUI server (see ``comfy_host.py`` and ``conftest.py``)."""
