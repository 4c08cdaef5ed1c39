"""Low-level model-file I/O: safetensors headers, positional tensor reads, PyTorch pickles, the streaming
safetensors writer and atomic file replacement. :mod:`cinetune.core.checkpoint` builds its reader on these and
re-exports the public names.

Formats: safetensors (8-byte little-endian header length, JSON header, raw little-endian data; see
https://github.com/huggingface/safetensors README "Format"), and PyTorch pickles (``.pt``/``.pth``/``.bin``/``.ckpt``)
read with ``torch.load(weights_only=True)``.

Reading: the header is parsed here (no safetensors call, so any safetensors version works) and each tensor is read
with positional reads (``os.preadv``; seek + ``readinto`` where the OS lacks it) straight into its destination
memory, or into one reused staging buffer (:class:`_Staging`) when it is converted. The file is never memory-mapped:
Linux refuses a private mapping larger than RAM + swap (a 38.6 GB Kandinsky 5 Pro file on a 24 GB host fails with
``unable to mmap … Cannot allocate memory`` under safetensors' ``load_file``), and mapped pages of a file read once
only crowd the page cache into the process.

Writing: :func:`save_file_atomic` streams a safetensors file tensor by tensor through :func:`atomic_path` (a
temporary file renamed over the target), so readers never see a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import struct
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A model file cannot be read or is not what was expected. The message says what and how to fix it."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and stored dtype of one tensor, read from a file header without loading the data."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16", "F32", "F8_E4M3"

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data (``numel · bits / 8``, rounded up for sub-byte codes)."""
        bits = _DTYPES[self.dtype][1] if self.dtype in _DTYPES else 8
        return (math.prod(self.shape) * bits + 7) // 8


_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_READ_CHUNK = 1 << 30  # bytes per read call (Linux returns at most 2 GiB − 4 KiB per call anyway)

# safetensors dtype code → (torch dtype or None when this torch lacks it, bits per element)
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8), "U8": (torch.uint8, 8), "I8": (torch.int8, 8), "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16), "I32": (torch.int32, 32), "U32": (getattr(torch, "uint32", None), 32),
    "I64": (torch.int64, 64), "U64": (getattr(torch, "uint64", None), 64), "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16), "F32": (torch.float32, 32), "F64": (torch.float64, 64),
    "C64": (torch.complex64, 64),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F4": (None, 4), "F6_E2M3": (None, 6), "F6_E3M2": (None, 6),
}
_CODES: dict[torch.dtype, str] = {dt: code for code, (dt, _) in _DTYPES.items() if dt is not None}
FP8_CODES = ("F8_E4M3", "F8_E5M2")


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` → ``"BF16"``).

    Raises:
        ValueError: the dtype has no safetensors code (e.g. complex128).
    """
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file") from None


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code (``"F8_E4M3"`` → ``torch.float8_e4m3fn``).

    Raises:
        CheckpointError: an unknown code, a sub-byte float (``F4``/``F6_*``: NVFP4/MXFP4 data) or a dtype this torch
            lacks.
    """
    if code not in _DTYPES:
        raise CheckpointError(f"unknown safetensors dtype {code!r}; the file is damaged or newer than this reader.")
    dt, bits = _DTYPES[code]
    if bits < 8:
        raise CheckpointError(f"{bits}-bit float tensors ({code}, e.g. NVFP4/MXFP4 weights) are not supported; use the "
                              "fp8 or bf16 version of the model file.")
    if dt is None:
        raise CheckpointError(f"this torch ({torch.__version__}) has no dtype for safetensors {code}; upgrade torch.")
    return dt


def is_fp8_code(code: str) -> bool:
    """True for the safetensors codes of fp8 weights (``F8_E4M3``, ``F8_E5M2``)."""
    return code in FP8_CODES


# ---------------------------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are: a safetensors file range, or a tensor already in memory (pickles)."""

    info: TensorInfo
    path: Path
    stored: str  # the tensor's name in the file
    begin: int = 0  # absolute file offsets
    end: int = 0
    tensor: torch.Tensor | None = None


def _parse_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file; re-download it.")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: not a safetensors file (bad header length {n}); expected a .safetensors model file.")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e}); check the disk and the file's permissions.") from e
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is damaged.") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is damaged.")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries: dict[str, _Entry] = {}
    end = 0
    for name, item in header.items():
        try:
            shape = tuple(int(s) for s in item["shape"])
            code = str(item["dtype"])
            begin, stop = (int(o) for o in item["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: header entry {name!r} is malformed ({e}); the file is damaged.") from e
        info = TensorInfo(shape, code)
        if code in _DTYPES and (stop - begin != info.nbytes or begin < 0):
            raise CheckpointError(f"{path}: header entry {name!r} claims {stop - begin} bytes for a {code} tensor "
                                  f"of shape {list(shape)} ({info.nbytes} bytes); the file is damaged.")
        entries[name] = _Entry(info, path, name, start + begin, start + stop)
        end = max(end, stop)
    if start + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {start + end} bytes but the file has {size}. "
            "The download or copy was interrupted; fetch the file again.")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read tensor names, shapes and dtypes (and ``__metadata__``) from a safetensors header.

    Returns:
        ``(tensors, metadata)``: ``tensors[name] = TensorInfo(shape, dtype)``; metadata as stored (str → str).
    Raises:
        CheckpointError: the file is missing, not safetensors, or truncated (data shorter than the header says).
    """
    entries, metadata = _parse_header(Path(path))
    return {k: e.info for k, e in entries.items()}, metadata


def _load_pickle(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise CheckpointError(f"{path}: cannot read this PyTorch file ({e}); it may be truncated.") from e
    for wrapper in ("state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _few(items, n: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable bytes of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Reader:
    """Positional reads from the files of one load, each file opened once."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}

    def _handle(self, path: Path):
        f = self._files.get(path)
        if f is None:
            try:
                f = self._files[path] = open(path, "rb", buffering=0)
            except OSError as e:
                message = f"{path}: cannot open the file ({e}); check that it exists and is readable."
                raise CheckpointError(message) from e
        return f

    def read_into(self, entry: _Entry, dest: torch.Tensor) -> None:
        """Fill ``dest`` (contiguous CPU tensor of exactly the entry's bytes) from the file."""
        total = entry.end - entry.begin
        if total == 0:
            return
        view = _byte_view(dest)
        f = self._handle(entry.path)
        done = 0
        try:
            while done < total:
                part = view[done: done + min(total - done, _READ_CHUNK)]
                if hasattr(os, "preadv"):
                    n = os.preadv(f.fileno(), [part], entry.begin + done)
                else:  # Windows: no positional read call
                    f.seek(entry.begin + done)
                    n = f.readinto(part)
                if not n:
                    raise CheckpointError(
                        f"{entry.path}: truncated: tensor {entry.stored!r} ends at byte {entry.end} but the file "
                        f"ended at {entry.begin + done}. The file was cut or replaced while loading; fetch it again.")
                done += n
        except OSError as e:
            raise CheckpointError(f"{entry.path}: read error in tensor {entry.stored!r} ({e}); the disk or the file "
                                  "is damaged: check the disk, then fetch the file again.") from e

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _empty(shape, dtype: torch.dtype, what: str, source: str) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as e:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raise CheckpointError(
            f"{source}: not enough host memory for {what} ({nbytes / 2**20:.0f} MiB, {e.__class__.__name__}). Free "
            "memory (close other programs or unload other models), or load the model in a smaller dtype (fp8) "
            "or from a smaller file.") from e


class _Staging:
    """One reused byte buffer for tensors that are converted after reading (never more than one tensor)."""

    def __init__(self, source: str) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)
        self.source = source

    def view(self, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        n = info.nbytes
        if self.buf.numel() < n:
            self.buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buf = _empty((n,), torch.uint8, "the staging buffer", self.source)
        return self.buf[:n].view(dtype).view(info.shape)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def temporary_beside(path: str | os.PathLike, *, folder: bool = False, tag: str = "") -> Path:
    """Create a new empty file (or folder) ``.<name>.<tag><8 random hex digits>.tmp`` beside ``path``, with the
    default permissions of a new file or folder (``0o666`` / ``0o777`` less the process umask), unlike ``tempfile``'s
    owner-only ones, since it is renamed into place and kept.

    Raises:
        FileExistsError: a hundred random names were all taken.
    """
    path = Path(path)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{tag}{secrets.token_hex(4)}.tmp"
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary {'folder' if folder else 'file'} beside {path}: every name "
                          "tried exists")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write to; on success fsync it and rename it over ``path``.

    Readers never see a half-written file and an interrupted write (any exception, Ctrl-C) leaves the previous
    file intact and no temporary file behind. The parent folder is created. The file gets the permissions of the
    file it replaces, or those of any newly created file (``0o666`` less the process umask, as ``open`` gives), not
    the owner-only mode of a private temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Stream a safetensors file, one tensor in memory at a time (its contiguous CPU copy when it needs one).

    Layout as safetensors writes it: tensors ordered by element size (largest first) then name, so each starts at a
    multiple of its element size; the header padded with spaces to a multiple of 8 bytes.
    """
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors needs a little-endian host")
    meta = {str(k): str(v) for k, v in metadata.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name in order:
        t = tensors[name]
        code = dtype_code(t.dtype)
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            t = tensors[name].detach()
            if t.numel():
                f.write(_byte_view(t.to("cpu").contiguous()))


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (:func:`atomic_path`), tensor by tensor: host memory beyond the tensors
    themselves is one tensor's contiguous CPU copy at most (a stride-0 ``expand`` of one value is materialised only
    while it is written). Metadata values must be strings."""
    with atomic_path(path) as tmp:
        _write_safetensors(tensors, tmp, dict(metadata or {}))
    return Path(path)


def write_json_atomic(data, path: str | os.PathLike, *, indent: int = 1) -> Path:
    """Write JSON (UTF-8, sorted keys) atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=indent, sort_keys=True), encoding="utf-8")
    return Path(path)
