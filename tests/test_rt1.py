"""RT-1 TFRecord reader/writer and the clip converter, checked against independent decoders.

Episodes are written in the on-disk RLDS format with `rt1.write_tfrecord`; the test walks the
file bytes itself (struct + a table-driven CRC32C written here, checked on the RFC 3720 test
vector) and decodes every `tf.train.Example` with a protobuf wire-format decoder written here, so
neither the framing nor the message layout is checked by the code under test. Conversion is
checked against clip counts, frames, action chunks and statistics computed here from the source
episodes with numpy.
"""

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from selfflow.data.raw import read_shard
from selfflow.robotics import rt1
from selfflow.robotics.convert import ConvertConfig, convert, find_shards

LENGTHS = (6, 8, 10)  # steps of the three test episodes
SUCCESS = (True, False, True)


# ---------------------------------------------------------------- independent references


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # reflected Castagnoli polynomial (RFC 3720)
        table.append(c)
    return table


CRC_TABLE = _crc_table()


def crc32c_reference(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_reference(data: bytes) -> int:
    crc = crc32c_reference(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def wire_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message: varints as int, length-delimited as bytes."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 2:
            size, pos = read_varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise AssertionError(f"unexpected wire type {wire_type} in a tf.train.Example")
        out.append((number, wire_type, value))
    return out


def decode_example(buf: bytes) -> dict[str, tuple[str, list]]:
    """A `tf.train.Example` by hand: Example.features=1 -> Features.feature=1 (map entries key=1, value=2)
    -> Feature oneof bytes_list=1 / float_list=2 / int64_list=3 -> value=1 (floats and int64 packed)."""
    ((number, wire_type, features),) = wire_fields(buf)
    assert (number, wire_type) == (1, 2)
    out = {}
    for number, wire_type, entry in wire_fields(features):
        assert (number, wire_type) == (1, 2)
        fields = {n: v for n, _, v in wire_fields(entry)}
        ((kind, _, values),) = wire_fields(fields[2])
        items = wire_fields(values)
        if kind == 1:
            out[fields[1].decode()] = ("bytes", [v for n, wt, v in items if (n, wt) == (1, 2)])
            continue
        assert len(items) <= 1 and all((n, wt) == (1, 2) for n, wt, _ in items), "numeric lists must be packed"
        packed = items[0][2] if items else b""
        if kind == 2:
            out[fields[1].decode()] = ("float", list(struct.unpack(f"<{len(packed) // 4}f", packed)))
        else:
            ints, pos = [], 0
            while pos < len(packed):
                v, pos = read_varint(packed, pos)
                ints.append(v - 2**64 if v >= 2**63 else v)
            out[fields[1].decode()] = ("int64", ints)
    return out


# ---------------------------------------------------------------- test episodes


def tiny_jpeg(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_episode(seed: int, num_steps: int, success: bool) -> rt1.Episode:
    rng = np.random.default_rng(seed)
    flags_first = np.arange(num_steps) == 0
    flags_last = np.arange(num_steps) == num_steps - 1
    return rt1.Episode(
        frames=[tiny_jpeg(rng) for _ in range(num_steps)],
        instruction=f"pick object {seed}",
        actions={
            "world_vector": rng.normal(size=(num_steps, 3)).astype(np.float32),
            "rotation_delta": rng.normal(size=(num_steps, 3)).astype(np.float32),
            "gripper_closedness_action": rng.uniform(-1, 1, (num_steps, 1)).astype(np.float32),
            "terminate_episode": np.eye(3, dtype=np.float32)[rng.integers(0, 3, num_steps)],
        },
        is_first=flags_first,
        is_last=flags_last,
        is_terminal=flags_last.copy(),
        metadata={"aspects/success": success, "attributes/task_family_name": "pick", "attributes/task_family": 2},
    )


@pytest.fixture(scope="module")
def episodes() -> list[rt1.Episode]:
    return [make_episode(i, n, s) for i, (n, s) in enumerate(zip(LENGTHS, SUCCESS, strict=True))]


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start of data, length) of each record, found with the test's own framing walk."""
    spans, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        spans.append((pos + 12, length))
        pos += 12 + length + 4
    return spans


def assert_same_episode(got: rt1.Episode, want: rt1.Episode) -> None:
    assert got.frames == want.frames
    assert got.instruction == want.instruction
    assert set(got.actions) == set(want.actions)
    for name, array in want.actions.items():
        assert got.actions[name].dtype == np.float32
        np.testing.assert_array_equal(got.actions[name], array)
    for name in ("is_first", "is_last", "is_terminal"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.metadata == want.metadata
    assert got.success is want.metadata["aspects/success"]


# ---------------------------------------------------------------- reader / writer


def test_crc_reference_vector():
    assert crc32c_reference(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value
    assert rt1.masked_crc32c(b"123456789") == masked_reference(b"123456789")


def test_written_file_has_tfrecord_framing_and_example_layout(tmp_path, episodes):
    path = tmp_path / "rt1.tfrecord"
    assert rt1.write_tfrecord(path, [rt1.write_episode_record(e) for e in episodes]) == 3
    data = path.read_bytes()
    pos = 0
    for episode in episodes:
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert length_crc == masked_reference(data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert data_crc == masked_reference(payload)
        pos += 12 + length + 4

        n = episode.num_steps
        features = decode_example(payload)
        assert features["steps/observation/image"] == ("bytes", episode.frames)
        assert features["steps/observation/natural_language_instruction"] == (
            "bytes",
            [episode.instruction.encode()] * n,
        )
        for name in ("world_vector", "rotation_delta", "gripper_closedness_action"):
            kind, values = features[f"steps/action/{name}"]
            assert kind == "float"
            np.testing.assert_array_equal(np.float32(values), episode.actions[name].ravel())
        one_hot = episode.actions["terminate_episode"].astype(int).ravel().tolist()
        assert features["steps/action/terminate_episode"] == ("int64", one_hot)
        for name in ("is_first", "is_last", "is_terminal"):
            assert features[f"steps/{name}"] == ("int64", getattr(episode, name).astype(int).tolist())
        assert features["aspects/success"] == ("int64", [int(episode.metadata["aspects/success"])])
        assert features["attributes/task_family_name"] == ("bytes", [b"pick"])
        assert features["attributes/task_family"] == ("int64", [2])
        assert len(features) == 12
    assert pos == len(data)


def test_hand_assembled_example_parses():
    # Example{features{feature{key: "a" value{int64_list{value: [1]}}}}}, assembled byte by byte
    wire = bytes.fromhex("0a0c0a0a0a016112051a030a0101")
    example = rt1.Example.FromString(wire)
    assert list(example.features.feature["a"].int64_list.value) == [1]
    assert example.SerializeToString() == wire


def test_read_back_every_field(tmp_path, episodes):
    path = tmp_path / "rt1.tfrecord"
    rt1.write_tfrecord(path, [rt1.write_episode_record(e) for e in episodes])
    got = [rt1.parse_episode(record) for record in rt1.read_tfrecord(path)]
    assert len(got) == 3
    for g, want in zip(got, episodes, strict=True):
        assert_same_episode(g, want)


def test_corrupt_data_byte_skips_that_record_only(tmp_path, episodes):
    path = tmp_path / "rt1.tfrecord"
    rt1.write_tfrecord(path, [rt1.write_episode_record(e) for e in episodes])
    data = bytearray(path.read_bytes())
    start, length = record_spans(bytes(data))[1]
    data[start + length // 2] ^= 0x40
    path.write_bytes(bytes(data))

    corrupt: list[rt1.CorruptRecordError] = []
    got = [rt1.parse_episode(r) for r in rt1.read_tfrecord(path, on_corrupt=corrupt.append)]
    assert [e.instruction for e in got] == [episodes[0].instruction, episodes[2].instruction]
    assert_same_episode(got[1], episodes[2])
    assert len(corrupt) == 1 and corrupt[0].index == 1 and corrupt[0].recoverable
    assert corrupt[0].offset == start - 12 and "checksum" in corrupt[0].reason

    strict = rt1.read_tfrecord(path)
    assert rt1.parse_episode(next(strict)).instruction == episodes[0].instruction
    with pytest.raises(rt1.CorruptRecordError, match="record 1"):
        next(strict)


def test_bad_length_checksum_and_truncated_tail_end_the_file(tmp_path, episodes):
    path = tmp_path / "rt1.tfrecord"
    rt1.write_tfrecord(path, [rt1.write_episode_record(e) for e in episodes])
    clean = path.read_bytes()
    spans = record_spans(clean)

    bad_length = bytearray(clean)
    bad_length[spans[1][0] - 12] ^= 0x01  # low byte of record 1's length
    path.write_bytes(bytes(bad_length))
    corrupt = []
    assert len(list(rt1.read_tfrecord(path, on_corrupt=corrupt.append))) == 1
    assert len(corrupt) == 1 and corrupt[0].index == 1 and not corrupt[0].recoverable

    path.write_bytes(clean[: spans[2][0] + spans[2][1] // 2])  # cut inside record 2's data
    corrupt = []
    got = [rt1.parse_episode(r) for r in rt1.read_tfrecord(path, on_corrupt=corrupt.append)]
    assert len(got) == 2 and len(corrupt) == 1
    assert corrupt[0].index == 2 and "truncated" in corrupt[0].reason and not corrupt[0].recoverable

    path.write_bytes(clean[: spans[1][0] - 5])  # cut inside record 1's header
    corrupt = []
    assert len(list(rt1.read_tfrecord(path, on_corrupt=corrupt.append))) == 1
    assert len(corrupt) == 1 and "truncated header" in corrupt[0].reason


def test_malformed_episodes_are_named(episodes):
    with pytest.raises(rt1.MalformedEpisodeError, match="tf.train.Example"):
        rt1.parse_episode(b"\x0a\xff\xff\xff")
    example = rt1.Example.FromString(rt1.write_episode_record(episodes[0]))
    del example.features.feature["steps/action/world_vector"]
    with pytest.raises(rt1.MalformedEpisodeError, match="steps/action/world_vector"):
        rt1.parse_episode(example.SerializeToString())
    example = rt1.Example.FromString(rt1.write_episode_record(episodes[0]))
    example.features.feature["steps/action/rotation_delta"].float_list.value.append(0.0)
    with pytest.raises(rt1.MalformedEpisodeError, match="19 values"):
        rt1.parse_episode(example.SerializeToString())


# ---------------------------------------------------------------- conversion


def expected_anchors(num_steps: int, context: int, future: int, stride: int, horizon: int) -> list[int]:
    """Every step whose clip lies inside the episode, by brute force over all steps."""
    anchors = []
    for t in range(num_steps):
        steps = [t - k * stride for k in range(context)] + [t + k * stride for k in range(1, future + 1)]
        steps += list(range(t, t + horizon))
        if all(0 <= s < num_steps for s in steps):
            anchors.append(t)
    return anchors


@pytest.fixture
def shard_dir(tmp_path, episodes) -> Path:
    """Two good shards (episodes 0+1; a record with a flipped byte, then episode 2) and a truncated one."""
    folder = tmp_path / "fractal"
    records = [rt1.write_episode_record(e) for e in episodes]
    rt1.write_tfrecord(folder / "rt1-train.tfrecord-00000-of-00003", records[:2])
    second = folder / "rt1-train.tfrecord-00001-of-00003"
    rt1.write_tfrecord(second, [records[0], records[2]])
    data = bytearray(second.read_bytes())
    start, length = record_spans(bytes(data))[0]
    data[start + length - 3] ^= 0xFF
    second.write_bytes(bytes(data))
    third = folder / "rt1-train.tfrecord-00002-of-00003"
    rt1.write_tfrecord(third, records[1:2])
    third.write_bytes(third.read_bytes()[:-40])
    return folder


def all_samples(out_dir: Path) -> list[dict]:
    shards = sorted(out_dir.glob("shard-*.tar"))
    samples = [s for shard in shards for s in read_shard(shard)]
    assert len(list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))) == len(samples)
    return samples


def test_convert_writes_every_clip_with_source_frames_and_actions(tmp_path, episodes, shard_dir):
    cfg = ConvertConfig(
        input=str(shard_dir),
        out_dir=str(tmp_path / "clips"),
        context_frames=2,
        future_frames=1,
        frame_stride=2,
        action_horizon=3,
        samples_per_shard=5,
    )
    summary = convert(cfg)
    anchors = [expected_anchors(e.num_steps, 2, 1, 2, 3) for e in episodes]
    assert [len(a) for a in anchors] == [2, 4, 6]  # 6, 8, 10 steps: t from 2 to T - 3
    samples = all_samples(Path(cfg.out_dir))
    assert len(samples) == sum(map(len, anchors)) == summary["clips_written"]
    assert [s["samples"] for s in summary["shards"]] == [5, 5, 2]
    assert len({s["__key__"] for s in samples}) == len(samples)

    by_source = {("rt1-train.tfrecord-00000-of-00003", 0): 0, ("rt1-train.tfrecord-00000-of-00003", 1): 1}
    by_source[("rt1-train.tfrecord-00001-of-00003", 1)] = 2  # record 0 of that file is the corrupt one
    seen = {i: [] for i in range(3)}
    for sample in samples:
        meta = json.loads(sample["json"])
        i = by_source[(meta["file"], meta["record"])]
        episode, t = episodes[i], meta["step"]
        seen[i].append(t)
        safe_name = meta["file"].replace("-", "_").replace(".", "_")
        assert sample["__key__"] == meta["episode"] + f"-{t:04d}" == f"{safe_name}_{meta['record']:05d}-{t:04d}"
        assert sample["ctx00.jpg"] == episode.frames[t - 2] and sample["ctx01.jpg"] == episode.frames[t]
        assert sample["fut00.jpg"] == episode.frames[t + 2] and "fut01.jpg" not in sample
        want = np.concatenate([episode.actions[k][t : t + 3] for k in ("world_vector", "rotation_delta")], axis=1)
        want = np.concatenate([want, episode.actions["gripper_closedness_action"][t : t + 3]], axis=1)
        chunk = np.load(io.BytesIO(sample["actions.npy"]))
        assert chunk.dtype == np.float32 and chunk.shape == (3, 7)
        np.testing.assert_array_equal(chunk, want)
        terminate = np.load(io.BytesIO(sample["terminate.npy"]))
        np.testing.assert_array_equal(terminate, episode.actions["terminate_episode"][t : t + 3])
        assert sample["txt"].decode() == episode.instruction
        assert meta["success"] is SUCCESS[i] and meta["frame_hw"] == [16, 20]
    assert {i: sorted(ts) for i, ts in seen.items()} == dict(enumerate(anchors))

    assert summary["episodes_read"] == 3 and summary["episodes_kept"] == 3 and summary["filtered"] == {}
    assert summary["corrupt_records"] == 2
    names = [f"rt1-train.tfrecord-0000{i}-of-00003" for i in range(3)]
    assert summary["corrupt_by_file"] == {names[1]: 1, names[2]: 1}
    assert [c["record"] for c in summary["corrupt"]] == [0, 0]
    assert json.loads((Path(cfg.out_dir) / "summary.json").read_text())["clips_written"] == len(samples)

    columns = ("world_vector", "rotation_delta", "gripper_closedness_action")
    source = np.concatenate([np.concatenate([e.actions[k] for k in columns], 1) for e in episodes]).astype(np.float64)
    stats = json.loads((Path(cfg.out_dir) / "stats.json").read_text())
    assert stats["count"] == sum(LENGTHS) and len(stats["names"]) == 7
    for name, want in [
        ("mean", source.mean(0)),
        ("std", source.std(0)),
        ("min", source.min(0)),
        ("max", source.max(0)),
        ("q01", np.percentile(source, 1, axis=0)),
        ("q99", np.percentile(source, 99, axis=0)),
    ]:
        np.testing.assert_allclose(stats[name], want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_success_only_resize_and_max_episodes(tmp_path, episodes, shard_dir):
    out = tmp_path / "clips"
    summary = convert(ConvertConfig(input=str(shard_dir), out_dir=str(out), success_only=True, resize=[8, 10]))
    samples = all_samples(out)
    kept = [expected_anchors(e.num_steps, 1, 4, 1, 4) for e in episodes]  # defaults: C=1, F=4, s=1, H=4
    assert len(samples) == len(kept[0]) + len(kept[2]) == summary["clips_written"]
    assert {json.loads(s["json"])["instruction"] for s in samples} == {episodes[0].instruction, episodes[2].instruction}
    assert summary["filtered"] == {"not_success": 1} and summary["episodes_kept"] == 2
    assert json.loads((out / "stats.json").read_text())["count"] == LENGTHS[0] + LENGTHS[2]
    with Image.open(io.BytesIO(samples[0]["fut03.jpg"])) as image:
        assert image.format == "JPEG" and image.size == (10, 8)

    # episode 0 (6 steps) cannot hold 6 future frames; episode 1 can (t = 0, 1); then max_episodes stops the run
    cfg = ConvertConfig(input=str(shard_dir / "*00000*"), out_dir=str(out), future_frames=6, max_episodes=1)
    summary = convert(cfg)
    assert summary["episodes_read"] == 2 and summary["episodes_kept"] == 1 and summary["filtered"] == {"too_short": 1}
    assert summary["files"] == ["rt1-train.tfrecord-00000-of-00003"]
    assert expected_anchors(LENGTHS[1], 1, 6, 1, 4) == [0, 1]
    assert sorted(json.loads(s["json"])["step"] for s in all_samples(out)) == [0, 1]  # earlier shards are gone


def test_convert_config_and_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="context_frames"):
        ConvertConfig(context_frames=0)
    with pytest.raises(ValueError, match="resize"):
        ConvertConfig(resize=[128])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_shards(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a shard")
    with pytest.raises(FileNotFoundError, match="empty"):
        convert(ConvertConfig(input=str(empty), out_dir=str(tmp_path / "out")))
    shutil.rmtree(empty)
