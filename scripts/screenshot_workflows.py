"""Screenshots of the example workflows as ComfyUI's frontend shows them, and a check of how it drew their links.

Starts a real ComfyUI (the provisioned 0.3.75 host, ``--cpu``, in a temporary folder) with this pack, opens the
frontend in headless Chromium, loads each UI-format workflow from ``example_workflows/`` as the template browser
does, zooms to show the whole graph and saves ``<out>/<name>.png``. For each it also prints the links the canvas
drew through a node body (there should be none). Needs Chromium and the playwright package (see
``tests/e2e/browser.py``). Screenshots are not kept in the repository; the thumbnails are made by
``scripts/make_thumbnails.py``.

Run: ``python scripts/screenshot_workflows.py [--workflow NAME ...] [--out out/screenshots]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "scripts"))

from browser import drawn_link_hits, fit_graph, load_workflow, missing_browser_reason, open_frontend  # noqa: E402
from comfy_host import ComfyServer, make_layout  # noqa: E402
from provision_host import provision_host  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", action="append", help="example workflow name without .json (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "screenshots", help="folder for the PNGs")
    parser.add_argument("--size", default="2400x1350", help="browser viewport WIDTHxHEIGHT in CSS pixels")
    parser.add_argument("--pack", type=Path, default=ROOT, help="the pack folder the server loads (default: this one)")
    args = parser.parse_args()
    reason = missing_browser_reason()
    if reason:
        print(f"Cannot take screenshots: {reason}", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    names = args.workflow or sorted(p.stem for p in (args.pack / "example_workflows").glob("*.json"))
    args.out.mkdir(parents=True, exist_ok=True)
    clean = True
    with tempfile.TemporaryDirectory(prefix="cinetune-shots-") as tmp:
        layout = make_layout(Path(tmp), {"cinetune": args.pack})
        with ComfyServer(provision_host(), layout) as server:
            with open_frontend(server.base_url + "/", viewport={"width": width, "height": height}) as page:
                for name in names:
                    workflow = json.loads((args.pack / "example_workflows" / f"{name}.json").read_text())
                    load_workflow(page, workflow)
                    fit_graph(page)
                    path = args.out / f"{name}.png"
                    page.screenshot(path=str(path))
                    drawn = drawn_link_hits(page)
                    clean = clean and not drawn["hits"] and not drawn["undrawn"]
                    print(f"{path}: links through nodes {drawn['hits'] or 'none'}"
                          + (f", links not drawn {drawn['undrawn']}" if drawn["undrawn"] else ""))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
