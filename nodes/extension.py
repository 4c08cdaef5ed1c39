"""The ComfyExtension that registers every Cinetune node."""

from comfy_api.latest import ComfyExtension, io

from . import k5, ltx2, ltx2_training, train_settings, trainer_k5, trainer_ltx2, training, video


class CinetuneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*k5.NODES, *ltx2.NODES, *ltx2_training.NODES, *training.NODES, *trainer_k5.NODES, *trainer_ltx2.NODES,
                *train_settings.NODES, *video.NODES]
