"""Read a difftrain run's TensorBoard logs with TensorBoard's own reader and print what it sees.

    .venv/bin/python scripts/read_tensorboard.py checkpoints/quickstart/logs

Uses `EventAccumulator` from the `tensorboard` package (pip install tensorboard), the class the
TensorBoard server loads runs with: it checks each record's masked CRC32C, and purges events
that a resumed session (SessionLog START) replaced. Prints every scalar tag with its count,
step range and first/last value, every image tag with its count and size. Exits 1 if the
directory holds no events.
"""
import glob
import os
import sys

from tensorboard.backend.event_processing import event_accumulator


def main(logdir):
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    print(f"{logdir}: {len(files)} event file(s)")
    for f in files:
        print(f"  {os.path.basename(f)} ({os.path.getsize(f)} bytes)")
    acc = event_accumulator.EventAccumulator(
        logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    total = 0
    for tag in sorted(tags["scalars"]):
        ev = acc.Scalars(tag)
        total += len(ev)
        print(
            f"scalar {tag:24s} count {len(ev):4d}  steps {ev[0].step}..{ev[-1].step}  "
            f"first {ev[0].value:.6g}  last {ev[-1].value:.6g}"
        )
        steps = [e.step for e in ev]
        if steps != sorted(set(steps)):
            print(f"  warning: {tag} has repeated or unordered steps: {steps}")
    for tag in sorted(tags["images"]):
        ev = acc.Images(tag)
        total += len(ev)
        sizes = sorted({(e.width, e.height) for e in ev})
        png = all(e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" for e in ev)
        print(
            f"image  {tag:24s} count {len(ev):4d}  steps {[e.step for e in ev]}  "
            f"sizes {sizes}  png {png}"
        )
    if total == 0:
        print("no events found", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
