"""The ComfyExtension that registers every Cinetune node."""

from comfy_api.latest import ComfyExtension, io

from . import k5, ltx2, ltx2_training, trainer, training, video


class CinetuneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*k5.NODES, *ltx2.NODES, *ltx2_training.NODES, *training.NODES, *trainer.NODES, *video.NODES]
