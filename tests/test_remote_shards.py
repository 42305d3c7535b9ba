"""Shards where clusters keep them: brace patterns, and http(s) URLs served by a real HTTP server on
loopback, one shard of which breaks off mid-transfer. The stream skips and counts the broken shard,
never hangs, and every batch holds exactly the tokens that were written."""

import io
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from webdataset import TarWriter

from selfflow.data.loader import LatentStream, LoaderConfig, prepared_modality, read_manifest, shard_list

TRUNCATED = "latent-000001.tar"


def write_shards(root: Path, shards: int = 3, per_shard: int = 8) -> dict[str, torch.Tensor]:
    """Latent shards as `selfflow prepare` writes them (tokens 4 x 6), and each key's tokens."""
    folder = root / "latents" / "image"
    folder.mkdir(parents=True)
    written = {}
    for s in range(shards):
        with TarWriter(str(folder / f"latent-{s:06d}.tar")) as tar:
            for i in range(per_shard):
                key = f"s{s}-{i:03d}"
                tokens = torch.full((4, 6), float(s * 100 + i))
                ids = torch.zeros(4, 4, dtype=torch.long)
                ids[:, 2] = torch.arange(4)
                buf = io.BytesIO()
                torch.save({"tokens": tokens, "ids": ids, "shape": [6, 1, 4]}, buf)
                tar.write({"__key__": key, "latent.pth": buf.getvalue(), "json": b'{"label": -1}'})
                written[key] = tokens
    manifest = {
        "modalities": {
            "image": {"token_dim": 6, "modality": {"name": "image", "autoencoder": "sd_vae", "path": "/models/vae"}}
        }
    }
    (root / "latents" / "manifest.json").write_text(json.dumps(manifest))
    return written


@pytest.fixture
def server(tmp_path):
    written = write_shards(tmp_path)

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            if not self.path.endswith(TRUNCATED):
                return super().do_GET()
            data = (tmp_path / "latents" / "image" / TRUNCATED).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))  # promises all of it ...
            self.end_headers()
            self.wfile.write(data[: len(data) // 3])  # ... and breaks off a third of the way in
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", written
    httpd.shutdown()
    httpd.server_close()


def test_http_shards_stream_and_a_broken_transfer_is_skipped_and_counted(server):
    base, written = server
    pattern = f"{base}/latents/image/latent-{{000000..000002}}.tar"
    assert len(shard_list(pattern)) == 3 and all(u.startswith("pipe:curl ") for u in shard_list(pattern))
    stream = LatentStream(LoaderConfig(pattern, shuffle_buffer=4), batch_size=4, seed=0)
    with pytest.warns(UserWarning, match="skipped corrupt data"):
        batches = [next(stream) for _ in range(12)]  # 48 samples from 16 whole ones: shards are resampled
    for batch in batches:
        for key, tokens in zip(batch.keys, batch.x0, strict=True):
            assert torch.equal(tokens, written[key])
    assert sum(stream.skipped.counts.values()) >= 1  # the broken transfer, counted
    assert {key.split("-")[0] for batch in batches for key in batch.keys} >= {"s0", "s2"}

    where, manifest = read_manifest(pattern)
    assert where == f"{base}/latents/manifest.json" and manifest["modalities"]["image"]["token_dim"] == 6
    assert prepared_modality(pattern, "image").autoencoder == "sd_vae"  # timesteps "auto" work remotely


def test_local_brace_patterns_and_missing_manifests(tmp_path):
    write_shards(tmp_path, shards=4)
    folder = tmp_path / "latents" / "image"
    urls = shard_list(str(folder / "latent-{000001..000002}.tar"))
    assert [Path(u).name for u in urls] == ["latent-000001.tar", "latent-000002.tar"]
    assert len(shard_list(str(folder))) == 4
    with pytest.raises(FileNotFoundError, match="no latent shards"):
        shard_list(str(folder / "latent-{000007..000009}.tar"))
    (tmp_path / "latents" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="set modalities.image.timesteps.distribution explicitly"):
        prepared_modality(str(folder), "image")


def test_strict_split_gives_each_rank_its_own_shards_and_resumes_exactly(tmp_path):
    written = write_shards(tmp_path, shards=6, per_shard=4)
    folder = str(tmp_path / "latents" / "image")
    cfg = LoaderConfig(folder, shuffle_buffer=1)  # samples in shard order: one batch of 4 is one shard

    def keys(stream, batches):
        return [next(stream).keys for _ in range(batches)]

    epoch = {rank: keys(LatentStream(cfg, batch_size=4, seed=0, rank=rank, world=2), 3) for rank in (0, 1)}
    seen = {rank: {key for batch in b for key in batch} for rank, b in epoch.items()}
    assert all(len({key.split("-")[0] for key in batch}) == 1 for b in epoch.values() for batch in b)  # one shard
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(written)  # one epoch: every shard once
    # the next epoch is another permutation, dealt out the same way
    second = {rank: keys(LatentStream(cfg, batch_size=4, seed=0, rank=rank, world=2), 6)[3:] for rank in (0, 1)}
    assert {k for b in second.values() for batch in b for k in batch} == set(written)
    # resume: a stream rebuilt at position 4 continues exactly as the uninterrupted one
    resumed = LatentStream(cfg, batch_size=4, seed=0, rank=1, world=2, position=4)
    assert resumed.split == "strict" and keys(resumed, 2) == second[1][1:]

    assert LatentStream(cfg, batch_size=4, seed=0, rank=0, world=8).split == "resample"  # auto: 6 shards, 8 ranks
    with pytest.raises(ValueError, match="6 shards cannot be split strictly between 8 ranks"):
        LatentStream(LoaderConfig(folder, split="strict"), batch_size=4, seed=0, world=8)


def test_read_ahead_hands_out_the_same_batches_and_counts_only_those_handed_out(tmp_path):
    from selfflow.data.prefetch import ReadAhead

    write_shards(tmp_path, shards=4, per_shard=4)
    folder = str(tmp_path / "latents" / "image")

    def streams(positions=None):
        positions = positions or {}
        cfg = LoaderConfig(folder, shuffle_buffer=4)
        return {
            name: LatentStream(cfg, batch_size=2, seed=i, position=positions.get(name, 0))
            for i, name in enumerate("ab")
        }

    order = lambda i: "ab"[i % 3 == 2]  # noqa: E731  (a, a, b, a, a, b, ...)
    plain = streams()
    expected = [next(plain[order(i)]).keys for i in range(7)]
    ahead = ReadAhead(streams(), order)
    got = [ahead.take(i).keys for i in range(4)]
    assert got == expected[:4]
    saved = ahead.positions()  # batch 4 is read ahead already, and not counted
    assert saved == {"a": 3, "b": 1} and ahead.streams["a"].position == 4
    resumed = ReadAhead(streams(saved), order)
    assert [resumed.take(i).keys for i in range(4, 7)] == expected[4:]  # what an uninterrupted run takes next
    with pytest.raises(RuntimeError, match="micro-batch 9 asked for, but 7 was read ahead"):
        resumed.take(9)
    for reader in (ahead, resumed):
        reader.close()


def test_read_ahead_raises_a_failed_read_at_its_micro_batch_and_does_not_count_it():
    from selfflow.data.prefetch import ReadAhead

    class Breaks:
        position = 0

        def __next__(self):
            if self.position == 2:
                raise ValueError("shard latent-000002.tar is damaged")
            self.position += 1
            return self.position

    ahead = ReadAhead({"a": Breaks()}, lambda i: "a")
    assert [ahead.take(0), ahead.take(1)] == [1, 2]
    assert ahead.positions() == {"a": 2}  # the failed read ahead moved nothing
    with pytest.raises(ValueError, match="latent-000002.tar is damaged"):
        ahead.take(2)
    ahead.close()
