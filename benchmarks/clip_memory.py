"""Peak memory of the robot clip loader against the size of the clip set (CPU, one process each).

    .venv/bin/python benchmarks/clip_memory.py [--clips 400] [--batches 60]

Writes two sets of clip shards as `selfflow robotics convert` lays them out (RT-1's 256 x 320 JPEG
frames, one context and two future frames, 2 actions; 100 clips a shard): N clips and 10 N clips.
For each, a fresh process streams `--batches` batches of 8 through `ClipStream` (shuffle buffer
512) and reports its peak resident memory (`ru_maxrss`) and the time per batch. The loader holds
the shuffle buffer, not the data set, so the two peaks should be close; the shards' total size is
printed beside them for scale (what a loader that reads everything up front would hold).
"""

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter


def write_clips(folder: Path, count: int, per_shard: int = 100) -> int:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(8):  # a few distinct noisy frames, so the JPEGs are RT-1-sized (tens of kB)
        pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
        frames.append(buf.getvalue())
    for s in range(0, count, per_shard):
        with TarWriter(str(folder / f"shard-{s // per_shard:06d}.tar"), encoder=False) as tar:
            for i in range(s, min(count, s + per_shard)):
                actions = io.BytesIO()
                np.save(actions, rng.normal(0, 0.05, (2, 7)).astype(np.float32))
                sample = {"__key__": f"clip{i:07d}", "actions.npy": actions.getvalue(), "txt": b"move the can"}
                sample |= {name: frames[(i + k) % 8] for k, name in enumerate(("ctx00.jpg", "fut00.jpg", "fut01.jpg"))}
                tar.write(sample)
    (folder / "stats.json").write_text(json.dumps({"mean": [0.0] * 7, "std": [1.0] * 7}))
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def measure(folder: str, batches: int) -> None:
    from selfflow.robotics.clips import ClipDataConfig, ClipStream
    from selfflow.robotics.finetune import FinetuneConfig

    stream = ClipStream(ClipDataConfig(shards=folder), FinetuneConfig().model, batch_size=8, seed=0)
    start = time.perf_counter()
    for _ in range(batches):
        stream.next_batch()
    seconds = (time.perf_counter() - start) / batches
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "s_per_batch": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.batches)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for count in (args.clips, 10 * args.clips):
            folder = Path(tmp) / f"clips_{count}"
            size = write_clips(folder, count)
            cmd = [sys.executable, __file__, "--measure", str(folder), "--batches", str(args.batches)]
            result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            rows.append((count, size / 2**20, result["peak_mib"], result["s_per_batch"]))
            print(
                f"{count:6d} clips, shards {size / 2**20:7.1f} MiB: peak RSS {result['peak_mib']:7.1f} MiB, "
                f"{1000 * result['s_per_batch']:.1f} ms per batch of 8"
            )
        print(f"10x the clips: peak memory x{rows[1][2] / rows[0][2]:.2f}, shard bytes x{rows[1][1] / rows[0][1]:.1f}")


if __name__ == "__main__":
    main()
