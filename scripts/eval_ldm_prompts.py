"""How often a text-conditioned latent diffusion run on datasets/shapes draws the prompted colour.

    .venv/bin/python scripts/eval_ldm_prompts.py $CARGO_TARGET_DIR/release/sample \
        checkpoints/ldm_quickstart [--num 8]

Samples `--num` images for each of the dataset's 24 captions ("a red circle", ...) with
difftrain's `sample` (the run's steps and guidance), finds each image's shape pixels (those
clearly brighter than the image's border) and names their mean colour by the nearest of the six
colours `scripts/make_datasets.py` draws with. Prints the accuracy per colour and overall.
Needs numpy and Pillow.
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 50, 47), "green": (64, 180, 60), "blue": (38, 110, 220),
    "yellow": (235, 200, 40), "magenta": (211, 54, 130), "cyan": (42, 190, 190),
}
SHAPES = ["circle", "square", "triangle", "diamond"]


def colour_of(img):
    a = img.reshape(-1, 3).astype(float)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(float).mean(0)
    bright = a[np.abs(a - border).sum(1) > 120]
    if len(bright) == 0:
        return None
    m = bright.mean(0)
    return min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - m) ** 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("checkpoint")
    ap.add_argument("--num", type=int, default=8)
    args = ap.parse_args()
    hits, total = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, colour in enumerate(COLOURS):
            for shape in SHAPES:
                out = os.path.join(tmp, f"{colour}_{shape}")
                subprocess.run([args.sample, "--checkpoint", args.checkpoint, "--prompt",
                                f"a {colour} {shape}", "--num", str(args.num), "--seed", str(k),
                                "--out", out], check=True, capture_output=True)
                for f in sorted(os.listdir(out)):
                    got = colour_of(np.asarray(Image.open(os.path.join(out, f)).convert("RGB")))
                    hits[colour] = hits.get(colour, 0) + (got == colour)
                    total[colour] = total.get(colour, 0) + 1
    for c in COLOURS:
        print(f"{c:8s} {hits[c]}/{total[c]}")
    print(f"prompted colour in {sum(hits.values())}/{sum(total.values())} samples "
          f"({100 * sum(hits.values()) / sum(total.values()):.1f}%)")


if __name__ == "__main__":
    main()
