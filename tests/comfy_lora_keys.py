"""Checks a LoRA file against the real ComfyUI LoRA key mapping (``comfy.lora`` of the test host).

Runs in a child process so ComfyUI's modules never enter the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_COMFY_SCRIPT = r"""
import json, logging, sys
from types import SimpleNamespace
host, base_path, out_path, strength, *lora_paths = sys.argv[1:]
sys.path.insert(0, host)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora
from safetensors.torch import load_file, save_file

class Grab(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

grab = Grab()
logging.getLogger().addHandler(grab)
base = load_file(base_path)
model = SimpleNamespace(state_dict=lambda: base, model_config=SimpleNamespace(unet_config={}))
key_map = comfy.lora.model_lora_keys_unet(model, {})
report, merged = {}, {}
for i, path in enumerate(lora_paths):
    grab.messages.clear()
    patches = comfy.lora.load_lora(load_file(path), key_map)
    prefix = "lora key not loaded: "
    report[path] = {"not_loaded": [m[len(prefix):] for m in grab.messages if m.startswith(prefix)],
                    "patched": sorted(patches)}
    for key, adapter in patches.items():
        patch = [(float(strength), adapter, 1.0, None, None)]
        merged[f"{i}/{key}"] = comfy.lora.calculate_weight(patch, base[key].clone(), key)
save_file(merged, out_path)
print("REPORT" + json.dumps(report))
"""


def native_lora_report(host: Path, base_path: Path, out_path: Path, strength: float, lora_paths) -> dict:
    """Map each LoRA file onto the diffusion-model keys in ``base_path`` (``diffusion_model.<path>.weight``) with
    ``comfy.lora.model_lora_keys_unet`` + ``comfy.lora.load_lora``; write the merged weights at ``strength`` to
    ``out_path`` (keys ``"<file index>/<weight key>"``).

    Returns:
        ``{lora_path: {"not_loaded": [keys ComfyUI skipped], "patched": [weight keys it patches]}}``.
    Raises:
        AssertionError: the child process failed (its stderr is in the message).
    """
    script = Path(out_path).with_suffix(".check.py")
    script.write_text(_COMFY_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(host), str(base_path), str(out_path), str(strength),
                             *map(str, lora_paths)], capture_output=True, text=True, cwd=Path(out_path).parent,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT", 1)[1])
