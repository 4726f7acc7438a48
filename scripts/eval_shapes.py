"""How many images look like the shapes dataset: one flat-coloured shape on a flat background.

    .venv/bin/python scripts/eval_shapes.py FOLDER [FOLDER...]   # folders of PNGs (sample --out DIR)
    .venv/bin/python scripts/eval_shapes.py --dataset datasets/shapes --size 16

Per image: the background colour is the median of the border pixels; the foreground is every
pixel more than 48 (of 255, in any channel) away from it. An image counts as a flat shape when
the foreground covers 4-70% of it, at least 85% of its interior pixels (foreground pixels whose
four neighbours are foreground too, so anti-aliased edges do not count) lie within 40 of the
foreground's median colour, and at least 90% of the background lies within 32 of the background
colour. Prints the fraction of flat shapes and the distinct foreground hues among them.
"""
import argparse
import colorsys
import os
import sys

import numpy as np
from PIL import Image


def flat_shape(img):
    img = img.astype(np.int32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    fg = np.abs(img - bg).max(axis=2) > 48
    frac = fg.mean()
    if not 0.04 <= frac <= 0.7:
        return None
    inner = fg.copy()
    inner[1:] &= fg[:-1]
    inner[:-1] &= fg[1:]
    inner[:, 1:] &= fg[:, :-1]
    inner[:, :-1] &= fg[:, 1:]
    inner[0] = inner[-1] = False
    inner[:, 0] = inner[:, -1] = False
    if inner.sum() < 2:
        return None
    colour = np.median(img[inner], axis=0)
    if (np.abs(img[inner] - colour).max(axis=1) <= 40).mean() < 0.85:
        return None
    if (np.abs(img[~fg] - bg).max(axis=1) <= 32).mean() < 0.9:
        return None
    return colour


def evaluate(images):
    hues = set()
    flat = 0
    for img in images:
        c = flat_shape(img)
        if c is not None:
            flat += 1
            r, g, b = (c / 255).tolist()
            hues.add(round(colorsys.rgb_to_hsv(r, g, b)[0] * 12) % 12)
    return flat / max(len(images), 1), len(hues)


def load(folder, size, limit=None):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:limit]
    out = []
    for f in files:
        im = Image.open(os.path.join(folder, f)).convert("RGB")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(im))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="*")
    ap.add_argument("--dataset")
    ap.add_argument("--size", type=int, default=0)
    args = ap.parse_args()
    for folder in ([args.dataset] if args.dataset else []) + args.folders:
        frac, hues = evaluate(load(folder, args.size, 512 if folder == args.dataset else None))
        print(f"{folder}: flat shapes {100 * frac:.0f}%, {hues} foreground hues")


if __name__ == "__main__":
    sys.exit(main())
