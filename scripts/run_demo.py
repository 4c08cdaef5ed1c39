"""The main job: start a real ComfyUI with Cinetune and run, through the API queue, on the embedded tiny
Kandinsky 5 and LTX-2 models:

1. example_workflows/k5_text_to_video.json — prints where the mp4 is;
2. example_workflows/k5_lora_training.json on a real dataset (the Big Buck Bunny clip and two photos, with
   captions): caches text and latents, trains a LoRA for 30 steps with every training settings node connected (at
   their defaults) and a validation prompt, samples with it — prints where the LoRA and the sampled mp4 are;
3. example_workflows/ltx2_text_to_video.json — video with sound: prints where the mp4 is and its audio stream;
4. example_workflows/ltx2_lora_training.json on the same dataset (the clip's AAC 5.1 sound, the photos with a silent
   track): caches captions, video and sound latents, trains an LTX-2 LoRA for 10 steps (video and audio losses) with
   the settings nodes and a validation clip of its validation prompt at the last step, samples with it — prints
   where the LoRA, the validation clip and the sampled mp4 (with sound) are.

Each UI-format example workflow is converted to API format with the running server's /object_info; its model
widgets are pointed at the tiny models and sizes and step counts are made small, so everything takes about a
minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "scripts"))

from cinetune.core.media import probe_audio  # noqa: E402
from comfy_host import ComfyClient, ComfyServer, make_layout, ui_to_api  # noqa: E402
from models import populate_models, tiny_workflow  # noqa: E402
from provision_host import provision_host  # noqa: E402


TRAINERS = ("CinetuneK5TrainLoRA", "CinetuneLTX2TrainLoRA")


def _sound(path: Path) -> str:
    """", with sound (codec, channels, rate, duration)" for an mp4 with an audio stream, else ""."""
    audio = probe_audio(path)
    if not audio:
        return ""
    return (f", with sound ({audio['codec']}, {audio['channels']} channels, {audio['sample_rate']} Hz, "
            f"{audio['duration'] or 0:.2f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflow", action="append", help="example workflow name(s) without .json "
                        "(default: k5_text_to_video, k5_lora_training, ltx2_text_to_video and ltx2_lora_training)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="folder for models, logs and outputs")
    args = parser.parse_args()

    host_dir = provision_host()
    layout = make_layout(args.out, {"cinetune": ROOT})
    names = populate_models(layout)
    workflows = args.workflow or ["k5_text_to_video", "k5_lora_training", "ltx2_text_to_video", "ltx2_lora_training"]
    print(f"ComfyUI host: {host_dir}\nTiny models: {names}")
    ok = True
    with ComfyServer(host_dir, layout, log_path=args.out / "comfyui.log") as server:
        client = ComfyClient(server.base_url)
        for name in workflows:
            workflow_ui = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
            lora_name = f"demo_lora_{time.strftime('%Y%m%d_%H%M%S')}"
            prompt = tiny_workflow(ui_to_api(workflow_ui, client.object_info()), names, output_name=lora_name)
            started = time.time()
            entry = client.run(prompt, timeout=1800)
            videos = [p for p in client.output_files(entry, layout.output) if p.suffix == ".mp4"]
            print(f"Workflow {name} finished in {time.time() - started:.1f} s.")
            if any(n["class_type"] in TRAINERS for n in prompt.values()):
                print(f"LoRA: {layout.models / 'loras' / (lora_name + '.safetensors')}")
            for path in videos:  # the trainer shows its newest validation clip, kept in its run folder
                kind = "Validation clip" if "runs" in path.relative_to(layout.output).parts[:2] else "Video"
                print(f"{kind}: {path}{_sound(path)}")
            ok = ok and bool(videos)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
