"""Generate the small datasets shipped in datasets/ (deterministic; rerun to regenerate).

    python scripts/make_datasets.py

- datasets/shapes/: 2048 RGB 32x32 PNGs of one filled shape (circle, square, triangle or
  diamond) in one of six colours on a dark background, with metadata.jsonl (file_name, text,
  label = shape index) in the Hugging Face imagefolder convention.
- datasets/mountain/: one procedurally drawn 512x512 mountain.jpg and metadata.jsonl with the
  caption "mountain", for the LoRA example.
Needs numpy and Pillow.
"""
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "datasets")
SHAPES = ["circle", "square", "triangle", "diamond"]
COLORS = {
    "red": (220, 50, 47),
    "green": (64, 180, 60),
    "blue": (38, 110, 220),
    "yellow": (235, 200, 40),
    "magenta": (211, 54, 130),
    "cyan": (42, 190, 190),
}


def draw_shape(rng, size=32):
    shape = int(rng.integers(len(SHAPES)))
    cname = list(COLORS)[int(rng.integers(len(COLORS)))]
    bg = tuple(int(v) for v in rng.integers(10, 50, size=3))
    img = Image.new("RGB", (size * 4, size * 4), bg)  # draw at 4x, downsample: anti-aliased
    d = ImageDraw.Draw(img)
    s = 4
    r = float(rng.uniform(7, 12)) * s
    cx, cy = (float(rng.uniform(r + 2 * s, size * s - r - 2 * s)) for _ in range(2))
    col = COLORS[cname]
    if SHAPES[shape] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif SHAPES[shape] == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif SHAPES[shape] == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=col)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
    return img.resize((size, size), Image.LANCZOS), f"a {cname} {SHAPES[shape]}", shape


def make_shapes(n=2048):
    out = os.path.join(ROOT, "shapes")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(out, "metadata.jsonl"), "w") as meta:
        for i in range(n):
            img, text, label = draw_shape(rng)
            name = f"{i:05d}.png"
            img.save(os.path.join(out, name), optimize=True)
            meta.write(json.dumps({"file_name": name, "text": text, "label": label}) + "\n")


def make_mountain(size=512):
    out = os.path.join(ROOT, "mountain")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1)
    y = np.linspace(0, 1, size)[:, None]
    sky = np.stack([110 + 100 * y, 160 + 70 * y, 235 + 15 * y], -1) * np.ones((1, size, 1))
    img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    xs = np.arange(size + 1)
    # Ridge: sum of sines plus a central peak.
    ridge = (0.55 * size - 0.30 * size * np.exp(-((xs - 0.5 * size) / (0.18 * size)) ** 2)
             + sum(rng.uniform(4, 14) * np.sin(xs / size * math.pi * k + rng.uniform(0, 6)) for k in (3, 7, 13, 29)))
    d.polygon([(0, size)] + [(int(x), int(r)) for x, r in zip(xs, ridge)] + [(size, size)], fill=(92, 84, 80))
    snow = ridge + 0.09 * size
    peak = ridge < 0.36 * size
    for x in xs[:-1]:
        if peak[x]:
            d.line([(int(x), int(ridge[x])), (int(x), int(min(snow[x], 0.36 * size + 12)))], fill=(245, 245, 250))
    d.rectangle([0, int(0.82 * size), size, size], fill=(58, 110, 52))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    img.save(os.path.join(out, "mountain.jpg"), quality=92)
    with open(os.path.join(out, "metadata.jsonl"), "w") as meta:
        meta.write(json.dumps({"file_name": "mountain.jpg", "text": "mountain"}) + "\n")


if __name__ == "__main__":
    make_shapes()
    make_mountain()
    print("wrote", ROOT)
