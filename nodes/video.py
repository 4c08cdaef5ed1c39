"""Video output node: writes an IMAGE batch (and optionally an AUDIO track) as an mp4 into ComfyUI's output folder."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.media import write_video
from . import host
from .checks import CinetuneNode, FileName


class SaveVideoMP4(CinetuneNode):
    # the counter and extension ComfyUI's numbered naming appends, written through a temporary file
    INPUT_RULES = {"filename_prefix": FileName(suffix="_00001_.mp4", atomic=True, subfolders=True)}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CinetuneSaveVideo",
            display_name="Save Video MP4",
            category="Cinetune/video",
            description="Saves frames as an H.264 mp4 (yuv420p) in the ComfyUI output folder, with an AAC audio "
                        "track when audio is connected.",
            inputs=[
                io.Image.Input("images", tooltip="Video frames as an IMAGE batch [frames, height, width, 3]."),
                io.Float.Input("fps", default=24.0, min=1.0, max=240.0, step=0.001,
                               tooltip="Frames per second. Kandinsky 5 generates 24 fps video."),
                io.String.Input("filename_prefix", default="cinetune/video",
                                tooltip="Output name prefix; may contain sub-folders (the example workflows use "
                                        "cinetune/<family>/<workflow>, beside the caches and runs in "
                                        "output/cinetune). A counter is appended."),
                io.Audio.Input("audio", optional=True,
                               tooltip="Optional sound (e.g. from LTX-2 Decode), muxed as AAC; trimmed or padded with "
                                       "silence to the video's duration."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps, filename_prefix, audio=None) -> io.NodeOutput:
        height, width = int(images.shape[1]), int(images.shape[2])
        folder, stem, counter, subfolder = host.save_path(filename_prefix, width, height)
        name = f"{stem}_{counter:05}_.mp4"
        track = {}
        if audio is not None:
            track = dict(audio=audio["waveform"][0].float().cpu(), audio_sample_rate=int(audio["sample_rate"]))
        write_video(images, folder / name, fps=fps, **track)
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(name, subfolder, io.FolderType.output)]))


NODES = [SaveVideoMP4]
