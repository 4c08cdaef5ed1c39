"""The ComfyExtension that registers every Cinetune node."""

from pathlib import Path

from comfy_api.latest import ComfyExtension, io

from . import host, k5, ltx2, ltx2_training, train_settings, trainer_k5, trainer_ltx2, training, video


class CinetuneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # called once at start-up by every host version (0.3.75 has no on_load call)
        host.install_example_inputs(Path(__file__).resolve().parents[1] / "example_workflows" / "input")
        return [*k5.NODES, *ltx2.NODES, *ltx2_training.NODES, *training.NODES, *trainer_k5.NODES, *trainer_ltx2.NODES,
                *train_settings.NODES, *video.NODES]
