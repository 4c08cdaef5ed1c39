"""ltx2 library: the LTX-2 19B audio+video model family in plain PyTorch; never imports ComfyUI."""

from . import family  # noqa: F401  (registers LTX-2 with the shared core)
