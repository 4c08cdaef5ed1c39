"""The only module that touches the ComfyUI host: folder_paths, comfy.*, server.

Everything else in the pack calls these wrappers, so the library stays testable without a server and
host API changes are absorbed in one place. Only APIs present in ComfyUI 0.3.75 and current releases are used.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..core.preview import LatentPreview

log = logging.getLogger("cinetune")


def model_names(folder: str) -> list[str]:
    """File names (relative, as ComfyUI lists them) in a model folder such as ``diffusion_models``."""
    return folder_paths.get_filename_list(folder)


def model_path(folder: str, name: str) -> Path:
    """Absolute path of ``name`` in model folder ``folder``.

    Raises:
        FileNotFoundError: the file is not in any path registered for that folder; the message lists them.
    """
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths(folder))
        raise FileNotFoundError(f"'{name}' is not in the ComfyUI '{folder}' folder ({roots}). Put the file there or pick another.")
    return Path(path)


def model_names_any(folders) -> list[str]:
    """File names listed in any of several model folders (first folder first, duplicates once)."""
    names: list[str] = []
    for folder in folders:
        names += [n for n in model_names(folder) if n not in names]
    return names


def model_path_any(folders, name: str) -> Path:
    """Absolute path of ``name`` in the first of ``folders`` that holds it.

    Raises:
        FileNotFoundError: no folder holds it; the message lists the folders.
    """
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return Path(path)
    raise FileNotFoundError(f"'{name}' is not in the ComfyUI folders {', '.join(folders)}. Put the file in one of them "
                            "or pick another.")


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory())


def save_path(prefix: str, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """ComfyUI's numbered output naming: ``(folder, filename_stem, counter, subfolder)`` under the output directory."""
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    return Path(full_folder), filename, counter, subfolder


def compute_device():
    """The torch device ComfyUI computes on (CPU under ``--cpu``)."""
    return mm.get_torch_device()


def offload_device():
    """Where idle diffusion models are parked (CPU unless ComfyUI runs in high-VRAM mode)."""
    return mm.unet_offload_device()


def free_host_models() -> None:
    """Unload ComfyUI-managed models and empty the device cache before a large pack-owned model runs."""
    mm.unload_all_models()
    mm.soft_empty_cache()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel / POST /interrupt."""
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI progress bar for ``total`` steps, shown on the executing node."""

    def __init__(self, total: int):
        self._bar = comfy.utils.ProgressBar(total)

    def update(self, done: int, total: int) -> None:
        self._bar.update_absolute(done, total)


def _host_latent_format(preview: LatentPreview):
    """The family's preview facts as a ComfyUI ``comfy.latent_formats.LatentFormat`` (the object the host's previewers
    read: channels, latent2rgb factors and bias, the TAESD decoder name, the model-space scale)."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.LatentFormat()
    fmt.latent_channels = preview.channels
    fmt.latent_dimensions = 3
    fmt.scale_factor = preview.latent_format.scaling_factor or 1.0
    fmt.latent_rgb_factors = [list(row) for row in preview.rgb_factors]
    fmt.latent_rgb_factors_bias = list(preview.rgb_bias)
    fmt.taesd_decoder_name = preview.taesd_decoder_name
    return fmt


class SamplingProgress:
    """Progress bar of a sampler node with latent previews through the host's configured preview method
    (``--preview-method``: none, auto/latent2rgb with the family's factors, or taesd where the family names a tiny
    decoder found in ``models/vae_approx``), as ComfyUI's own samplers show them (``latent_preview.prepare_callback``).

    Pass :meth:`on_step` as the library sampler's ``on_step`` callback. A preview that fails to render is logged once
    and switched off; the sampling goes on.

    Args:
        preview: the family's :class:`~cinetune.core.preview.LatentPreview`.
        total: sampling steps.
    """

    def __init__(self, preview: LatentPreview, total: int):
        import latent_preview

        self._preview = preview
        self._bar = comfy.utils.ProgressBar(total)
        self._previewer = latent_preview.get_previewer(compute_device(), _host_latent_format(preview))

    @property
    def previews(self) -> bool:
        """Whether the host renders previews (its preview method is not ``none``)."""
        return self._previewer is not None

    def on_step(self, step: int, total: int, x0) -> None:
        """After step ``step`` of ``total``: move the bar and send a preview of ``x0`` (the family's ``LATENT``
        convention, ``[B, C, F', H', W']``) to the client that queued the prompt."""
        image = None
        if self._previewer is not None:
            try:
                image = self._previewer.decode_latent_to_preview_image(
                    "JPEG", self._preview.latent_format.to_model(x0[:1, :, :1].float()))
            except Exception:  # noqa: BLE001 - a preview must never end a long sampling run
                log.warning("Latent preview failed and is switched off for this run.", exc_info=True)
                self._previewer = None
        self._bar.update_absolute(step, total, image)


def host_tokenizer_dir(name: str) -> Path | None:
    """A tokenizer folder shipped inside ComfyUI (``qwen25_tokenizer`` → Qwen2.5 vocab, ``sd1_tokenizer`` → CLIP),
    or None when this ComfyUI version does not ship it."""
    comfy_root = Path(comfy.utils.__file__).parent
    for candidate in (comfy_root / "text_encoders" / name, comfy_root / name):
        if candidate.is_dir():
            return candidate
    return None


def pinned_memory_allowed() -> bool:
    """False when ComfyUI was started with ``--disable-pinned-memory`` (newer releases have the flag)."""
    from comfy.cli_args import args

    return not getattr(args, "disable_pinned_memory", False)


@contextmanager
def on_compute_device(model):
    """Move a pack-owned model (anything with ``.to(device)``) to the compute device for the body, then back to the
    CPU, also when the body raises. Yields the device."""
    device = compute_device()
    model.to(device)
    try:
        yield device
    finally:
        model.to("cpu")


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def model_folder(folder: str) -> Path:
    """The first registered path of a model folder (where new files such as trained LoRAs are written)."""
    path = Path(folder_paths.get_folder_paths(folder)[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def send_event(event: str, data: dict) -> None:
    """Send a JSON websocket event to every connected client (no-op when no server runs)."""
    from server import PromptServer

    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


def current_prompt_id() -> str | None:
    """The id of the prompt being executed, when the host exposes it."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return getattr(context, "prompt_id", None)


def free_device_memory() -> int | None:
    """Free bytes on the compute device as ComfyUI sees them (None on the CPU, where it is not meaningful)."""
    device = compute_device()
    if device.type == "cpu":
        return None
    return int(mm.get_free_memory(device))


def install_example_inputs(folder: Path) -> list[Path]:
    """Copy the example workflows' input files (e.g. the image-to-video start image) from ``folder`` into ComfyUI's
    input folder, leaving any file of the same name that is already there untouched.

    Returns:
        The files copied. Errors are logged, never raised: a read-only input folder must not stop the pack loading.
    """
    import shutil

    copied: list[Path] = []
    if not folder.is_dir():
        return copied
    try:
        target = input_directory()
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(folder.iterdir()):
            dst = target / src.name
            if src.is_file() and not dst.exists():
                shutil.copyfile(src, dst)
                copied.append(dst)
    except OSError as e:
        log.warning("Cinetune: could not copy the example inputs from %s into the input folder (%s); copy them "
                    "by hand to run the image-to-video examples.", folder, e)
    return copied
