"""Makes the files shipped beside the example workflows: the start image the image-to-video examples read
(``example_workflows/input/astronaut.png``: scikit-image's astronaut photo, NASA, public domain, 384×384) and one
thumbnail per workflow for ComfyUI's template browser (``example_workflows/<name>.jpg``).

A thumbnail is a real frame the workflow produced: a real ComfyUI (the provisioned 0.3.75 host, ``--cpu``) runs
each example through the API queue on the embedded tiny models, as ``scripts/run_demo.py`` does (small size, few
steps; training examples train a few steps first), and the middle frame of the video its Save Video node wrote is
scaled up (nearest neighbour) to ``--width`` pixels. Tiny random-weight models draw noise-like frames; with real
models installed the same script would show real ones.

Run: ``python scripts/make_thumbnails.py [--workflow NAME ...] [--out out/thumbnails]``.
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

from cinetune.core.checkpoint import atomic_path  # noqa: E402
from cinetune.core.media import read_video  # noqa: E402
from comfy_host import ComfyClient, ComfyServer, make_layout, ui_to_api  # noqa: E402
from make_workflows import EXAMPLE_INPUTS, EXAMPLES, WORKFLOWS  # noqa: E402
from models import populate_models, tiny_workflow  # noqa: E402
from provision_host import provision_host  # noqa: E402

START_IMAGE_SIZE = 384
TRAINING_STEPS = 4
SAVE_NODE = "7"  # the Save Video node of every example workflow


def write_example_inputs() -> list[Path]:
    """Write ``example_workflows/input/astronaut.png`` from the scikit-image photo (provisioned test data)."""
    import provision_test_data
    from PIL import Image

    photo = Image.open(provision_test_data.locate_media()["astronaut"]).convert("RGB")
    target = EXAMPLE_INPUTS / "astronaut.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        photo.resize((START_IMAGE_SIZE, START_IMAGE_SIZE), Image.LANCZOS).save(tmp, format="PNG", optimize=True)
        tmp.chmod(0o644)
    return [target]


def thumbnail(video: Path, target: Path, width: int) -> None:
    """Save the middle frame of ``video``, scaled to ``width`` pixels wide (nearest neighbour), as a JPEG."""
    from PIL import Image

    frames, _ = read_video(video)
    frame = Image.fromarray(frames[len(frames) // 2].numpy())
    height = max(1, round(frame.height * width / frame.width))
    with atomic_path(target) as tmp:
        frame.resize((width, height), Image.NEAREST).save(tmp, format="JPEG", quality=88)
        tmp.chmod(0o644)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", action="append", help="example workflow name without .json (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "thumbnails", help="folder for models and logs")
    parser.add_argument("--width", type=int, default=512, help="thumbnail width in pixels")
    parser.add_argument("--pack", type=Path, default=ROOT, help="the pack folder the server loads (default: this one)")
    args = parser.parse_args()
    for path in write_example_inputs():
        print(f"Example input: {path}")
    names = args.workflow or list(WORKFLOWS)
    layout = make_layout(args.out, {"cinetune": args.pack})
    tiny_names = populate_models(layout)
    with ComfyServer(provision_host(), layout, log_path=args.out / "comfyui.log") as server:
        client = ComfyClient(server.base_url)
        for name in names:
            workflow_ui = json.loads((EXAMPLES / f"{name}.json").read_text())
            prompt = tiny_workflow(ui_to_api(workflow_ui, client.object_info()), tiny_names,
                                   output_name=f"thumbnail_{name}_{time.strftime('%Y%m%d_%H%M%S')}",
                                   max_steps=TRAINING_STEPS)
            entry = client.run(prompt, timeout=1800)
            (item,) = entry["outputs"][SAVE_NODE]["images"]
            video = layout.output / (item.get("subfolder") or "") / item["filename"]
            target = EXAMPLES / f"{name}.jpg"
            thumbnail(video, target, args.width)
            print(f"{target} from frame of {video}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
