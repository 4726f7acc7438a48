"""How many images look like the shapes dataset: one flat-coloured shape on a flat background.

    .venv/bin/python scripts/eval_shapes.py FOLDER [FOLDER...]   # folders of PNGs (sample --out DIR)
    .venv/bin/python scripts/eval_shapes.py --dataset datasets/shapes --size 16

Per image: the background colour is the median of the border pixels; the foreground is every
pixel more than 48 (of 255, in any channel) away from it. An image counts as a flat shape when
the foreground covers 4-70% of it, at least 85% of its interior pixels (foreground pixels whose
four neighbours are foreground too, so anti-aliased edges do not count) lie within 40 of the
foreground's median colour, and at least 90% of the background lies within 32 of the background
colour. Prints the fraction of flat shapes, the distinct foreground hues among them, and how
many of them are each of the dataset's four shapes: by the foreground's fill of its bounding box
(square > 0.9, circle > 0.7) and, for the two that fill about half, by where its mass sits
(a triangle's centroid is low in its box, at ~0.63 of the height; a diamond's is at 0.5).
With `--dataset`, the shape rule is also checked against the dataset's labels (metadata.jsonl).
"""
import argparse
import colorsys
import json
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
    return colour, shape_of(fg)


SHAPES = ["circle", "square", "triangle", "diamond"]  # the dataset's label order


def shape_of(fg):
    """Which of the four shapes a foreground mask is (see the module doc)."""
    ys, xs = np.nonzero(fg)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = fg.sum() / (h * w)
    if fill > 0.9:
        return "square"
    if fill > 0.7:
        return "circle"
    centroid = (ys.mean() - ys.min() + 0.5) / h
    return "triangle" if centroid > 0.565 else "diamond"


def evaluate(images):
    hues = set()
    flat = 0
    shapes = dict.fromkeys(SHAPES, 0)
    for img in images:
        found = flat_shape(img)
        if found is not None:
            c, shape = found
            flat += 1
            shapes[shape] += 1
            r, g, b = (c / 255).tolist()
            hues.add(round(colorsys.rgb_to_hsv(r, g, b)[0] * 12) % 12)
    return flat / max(len(images), 1), len(hues), shapes


def load_one(path, size):
    im = Image.open(path).convert("RGB")
    if size and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im)


def load(folder, size, limit=None):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:limit]
    return [load_one(os.path.join(folder, f), size) for f in files]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="*")
    ap.add_argument("--dataset")
    ap.add_argument("--size", type=int, default=0)
    args = ap.parse_args()
    if args.dataset and os.path.exists(os.path.join(args.dataset, "metadata.jsonl")):
        rows = [json.loads(l) for l in open(os.path.join(args.dataset, "metadata.jsonl"))][:512]
        right = total = 0
        for row in rows:
            found = flat_shape(load_one(os.path.join(args.dataset, row["file_name"]), args.size))
            if found is not None and "label" in row:
                total += 1
                right += found[1] == SHAPES[row["label"]]
        print(f"{args.dataset}: the shape rule names {right} of {total} flat dataset images right")
    for folder in ([args.dataset] if args.dataset else []) + args.folders:
        frac, hues, shapes = evaluate(load(folder, args.size, 512 if folder == args.dataset else None))
        counts = ", ".join(f"{n} {k}s" for k, n in shapes.items())
        print(f"{folder}: flat shapes {100 * frac:.0f}%, {hues} foreground hues ({counts})")


if __name__ == "__main__":
    sys.exit(main())
