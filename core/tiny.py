"""Helpers for the tiny random-weight models every family writes in its real published formats (demo and tests):
deterministic tensors, tokenizer folders, atomically written model folders. Nothing here is committed as weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path

import torch

from .safetensors_io import temporary_beside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def seeded_tensor(seed: int, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic random tensor for parameter ``name`` (initialisation, chosen so activations stay O(1):
    weights with ≥ 2 dims ~ N(0, 1/fan_in); 1-d ``*.weight`` (norm scales) 1 + N(0, 0.1²); biases N(0, 0.02²)).

    The generator seed is ``seed * 1_000_003 + crc32(name)``, so each tensor depends only on ``seed`` and its name.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) <= 1:
        noise = torch.randn(shape, generator=g)
        t = 0.02 * noise if name.endswith("bias") else 1.0 + 0.1 * noise
    else:
        t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return t.to(dtype)


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """Number of token ids (max id + 1) of a BPE tokenizer folder, read from its files."""
    ids: list[int] = []
    if (tokenizer_dir / "tokenizer.json").is_file():
        tj = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        ids += list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens", [])]
    elif (tokenizer_dir / "vocab.json").is_file():
        ids += list(json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8")).values())
        cfg = tokenizer_dir / "tokenizer_config.json"
        if cfg.is_file():
            ids += [int(i) for i in json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {})]
    else:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json or vocab.json; pass a tokenizer folder.")
    return max(ids) + 1


def copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    """Copy the tokenizer files of ``tokenizer_dir`` into ``dest``.

    Raises:
        FileNotFoundError: there are none.
    """
    copied = 0
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, dest / name)
            copied += 1
    if not copied:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files to copy.")


def write_folder_atomic(folder: Path, fill) -> Path:
    """Build a folder in a temporary sibling with ``fill(tmp)``, then swap it into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(folder, folder=True)
    try:
        fill(tmp)
        if folder.exists():
            old = temporary_beside(folder, folder=True, tag="old.")
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_hf_folder(folder: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor], first_shard: str,
                    tokenizer_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face snapshot folder atomically: ``config.json``, the tensors in two safetensors shards (the
    tensor ``first_shard`` alone in the first, as published snapshots put the embeddings apart) with
    ``model.safetensors.index.json``, and the tokenizer files of ``tokenizer_dir``.

    Raises:
        FileNotFoundError: ``tokenizer_dir`` has no tokenizer files.
    """
    from .checkpoint import save_file_atomic

    shards = {"model-00001-of-00002.safetensors": {first_shard},
              "model-00002-of-00002.safetensors": set(tensors) - {first_shard}}

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        weight_map = {}
        for fname, names in shards.items():
            save_file_atomic({k: tensors[k] for k in names}, tmp / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        copy_tokenizer(Path(tokenizer_dir), tmp)

    return write_folder_atomic(Path(folder), fill)
