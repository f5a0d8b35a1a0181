"""Regenerate the bundled workflows and their thumbnails on a fresh ComfyUI server.

    .venv/bin/python -m devtools.build_workflows [--skip-build]

1. tests/browser/build_workflows.mjs builds every workflow in the real frontend and writes workflows/<name>.json
   (UI format) and workflows/api/<name>.json (the frontend's own export of it);
2. each API twin runs on the nano models, on the fresh server as it is (nothing uploaded: a bundled workflow must
   run as it opens), and its images become workflows/<name>.jpg, the thumbnail ComfyUI's template browser shows.
Needs node, chromium and tests/browser/node_modules (`python3 install.py test` installs them).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from zimage_client.server import ComfyServer

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
THUMBNAIL = 384  # px, square


def build(url: str) -> list[str]:
    proc = subprocess.run(["node", str(REPO_ROOT / "tests" / "browser" / "build_workflows.mjs")],
                          input=json.dumps({"url": url, "out": str(WORKFLOWS)}), capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode:
        raise SystemExit(f"building the workflows failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["written"]


def thumbnail(images: list[Image.Image]) -> Image.Image:
    """The pictures in a square grid (a batch of 4 as 2 x 2), a transparent hole shown as grey."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell = THUMBNAIL // max(cols, rows)
    sheet = Image.new("RGB", (THUMBNAIL, THUMBNAIL), (24, 24, 24))
    top = (THUMBNAIL - rows * cell) // 2
    for i, image in enumerate(images):
        if image.mode == "RGBA":
            image = Image.alpha_composite(Image.new("RGBA", image.size, (128, 128, 128, 255)), image)
        sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS),
                    ((i % cols) * cell + (THUMBNAIL - cols * cell) // 2, top + (i // cols) * cell))
    return sheet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-build", action="store_true", help="only re-render the thumbnails")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        names = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) if args.skip_build else build(server.url)
        client = server.client()
        for name in names:
            path = WORKFLOWS / "api" / f"{name}.json"
            prompt = json.loads(path.read_text(encoding="utf-8"))
            result = client.run(prompt, timeout=900)
            if result.status != "success":
                raise SystemExit(f"{name} failed: {result.error}")
            # The workflow's pictures: saved images, else previews; never the k_gen plot. In the prompt's node order,
            # not the order the nodes ran in (independent branches may run either way round), so that each edit's
            # result sits under its input picture.
            report_ids = {i for i, node in prompt.items() if node["class_type"] == "ZImageKGenReport"}
            shown = [img for node_id in prompt if node_id in result.outputs and node_id not in report_ids
                     for img in result.outputs[node_id].get("images", [])]
            pictures = [Image.open(io.BytesIO(client.view(img))) for img in shown]
            # An edit's thumbnail shows its example pictures above what the workflow made of them.
            inputs = [Image.open(WORKFLOWS / node["inputs"]["image"]) for node in prompt.values()
                      if node["class_type"] == "ZImageExampleImage"]
            pictures = inputs + pictures
            thumbnail(pictures).save(WORKFLOWS / f"{name}.jpg", quality=88, optimize=True)
            print(f"{name}: {len(pictures)} picture(s) -> workflows/{name}.jpg", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
