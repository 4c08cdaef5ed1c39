"""The main job: start a real ComfyUI with Cinetune, run example_workflows/k5_text_to_video.json on the
embedded tiny Kandinsky 5 models through the API queue, and print where the mp4 is.

The UI-format example workflow is converted to API format with the running server's /object_info; its model
widgets are pointed at the tiny models and the video size is made small so the run takes about a minute on a CPU.
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

from comfy_host import ComfyClient, ComfyServer, make_layout, ui_to_api  # noqa: E402
from models import populate_models, tiny_workflow  # noqa: E402
from provision_host import provision_host  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflow", default="k5_text_to_video", help="example workflow name (without .json)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="folder for models, logs and outputs")
    args = parser.parse_args()

    host_dir = provision_host()
    layout = make_layout(args.out, {"cinetune": ROOT})
    names = populate_models(layout)
    workflow_ui = json.loads((ROOT / "example_workflows" / f"{args.workflow}.json").read_text())
    print(f"ComfyUI host: {host_dir}\nTiny models: {names}")
    with ComfyServer(host_dir, layout, log_path=args.out / "comfyui.log") as server:
        client = ComfyClient(server.base_url)
        prompt = tiny_workflow(ui_to_api(workflow_ui, client.object_info()), names)
        started = time.time()
        entry = client.run(prompt, timeout=1800)
        videos = [p for p in client.output_files(entry, layout.output) if p.suffix == ".mp4"]
    print(f"Workflow {args.workflow} finished in {time.time() - started:.1f} s.")
    for path in videos:
        print(f"Video: {path}")
    return 0 if videos else 1


if __name__ == "__main__":
    sys.exit(main())
