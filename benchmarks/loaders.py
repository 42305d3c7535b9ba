"""Samples/s of each loader on this machine: raw media decode (what `prepare` reads) and latent
shard read (what training reads), per modality.

    python benchmarks/loaders.py --raw data/synth/raw --latents data/synth/latents [--batches 50]

Run `selfflow synth` and `selfflow prepare` first (the demo's defaults give both folders).
"""

import argparse
import time
from pathlib import Path

from selfflow.data.loader import LatentStream, LoaderConfig
from selfflow.data.raw import decode_audio, decode_image, decode_video, find_media, read_shard


def decode(modality: str, data: bytes) -> None:
    if modality == "image":
        decode_image(data)
    elif modality == "video":
        decode_video(data)
    else:
        decode_audio(data, channels=1, sample_rate=16000)


def raw_rate(folder: Path, modality: str) -> tuple[int, float]:
    """Decode every sample of the raw shards once (tar read + media decode); samples/s."""
    start, count = time.perf_counter(), 0
    for shard in sorted((folder / modality).glob("*.tar")):
        for sample in read_shard(shard):
            decode(modality, find_media(sample, modality)[1])
            count += 1
    return count, count / (time.perf_counter() - start)


def latent_rate(folder: Path, modality: str, batch_size: int, batches: int) -> tuple[int, float]:
    """Read `batches` batches from the endless latent stream (after one warm-up batch); samples/s."""
    stream = LatentStream(LoaderConfig(str(folder / modality)), batch_size, seed=0)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size, batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=Path("data/synth/raw"))
    parser.add_argument("--latents", type=Path, default=Path("data/synth/latents"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    for modality in ("image", "video", "audio"):
        n_raw, raw = raw_rate(args.raw, modality)
        n_lat, lat = latent_rate(args.latents, modality, args.batch_size, args.batches)
        print(f"{modality:6s} raw decode {raw:8.1f} samples/s ({n_raw}) | latent read {lat:8.1f} samples/s ({n_lat})")


if __name__ == "__main__":
    main()
