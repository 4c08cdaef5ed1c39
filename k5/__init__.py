"""k5 library: plain PyTorch, never imports ComfyUI. Importing it registers Kandinsky 5 (:mod:`.family`)."""

from . import family  # noqa: F401  (registers the family with core.family)
from . import detect  # noqa: F401  (registers its file recogniser with core.checkpoint)
