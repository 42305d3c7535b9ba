"""RT-1 `fractal20220817_data` episodes read (and written) without TensorFlow: TFRecord framing + `tf.train.Example`.

The Open X-Embodiment release of RT-1 is an RLDS/TFDS dataset: TFRecord shards
(`fractal20220817_data-train.tfrecord-00000-of-01024`, ...) holding one `tf.train.Example` per
episode. TFDS flattens the nested feature dict with "/" and stores each per-step field of the
`steps` sequence as one list concatenated over the steps; bools and int32 become int64 lists,
strings and encoded images bytes lists (tensorflow/datasets `core/example_serializer.py`).

    for record in read_tfrecord("fractal20220817_data-train.tfrecord-00000-of-01024"):
        episode = parse_episode(record)          # Episode: frames (JPEG bytes), instruction, actions, ...
    write_tfrecord("tiny.tfrecord", [write_episode_record(episode)])   # the same on-disk format

Feature keys used (tensorflow/datasets `docs/catalog/fractal20220817_data.md`, version 0.1.0):

    steps/observation/image                        Image (256, 320, 3) uint8, one encoded frame per step
    steps/observation/natural_language_instruction string per step
    steps/action/world_vector                      float32 (3,)  end-effector displacement, base frame
    steps/action/rotation_delta                    float32 (3,)  roll/pitch/yaw displacement, base frame
    steps/action/gripper_closedness_action         float32 (1,)
    steps/action/terminate_episode                 int32 (3,)    one-hot
    steps/is_first, steps/is_last, steps/is_terminal   bool
    aspects/success (+ already_success, feasible, has_aspects, undesirable)   bool, per episode
    attributes/...  (collection_mode, env_name, task_family_name, ...)        int64 / string, per episode

Other step fields (observation/natural_language_embedding, base_pose_tool_reached, reward, ...)
are ignored by `parse_episode`; every key outside `steps/` lands in `Episode.metadata`.

TFRecord framing (tensorflow `core/lib/io/record_writer.cc`, little-endian): uint64 length,
uint32 masked CRC32C of the length bytes, the data, uint32 masked CRC32C of the data, where
mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32 (`core/lib/hash/crc32c.h`).

Why no third-party Example package: the three messages are tiny and stable, so they are built
at import time from a `FileDescriptorProto` written out below (field numbers as in tensorflow
`core/example/{example,feature}.proto`) and compiled by the real protobuf runtime into a private
descriptor pool, which cannot clash with TensorFlow's own registration if both are imported.
"""

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

# ---------------------------------------------------------------- tf.train.Example messages

_FIELD = descriptor_pb2.FieldDescriptorProto


def _example_file_proto() -> descriptor_pb2.FileDescriptorProto:
    """tensorflow/core/example/feature.proto + example.proto (proto3, package `tensorflow`) as a descriptor."""
    packed = descriptor_pb2.FieldOptions(packed=True)
    repeated, optional = _FIELD.LABEL_REPEATED, _FIELD.LABEL_OPTIONAL
    f = descriptor_pb2.FileDescriptorProto(name="tensorflow/core/example/example.proto", package="tensorflow")
    f.syntax = "proto3"
    f.message_type.add(name="BytesList").field.add(name="value", number=1, label=repeated, type=_FIELD.TYPE_BYTES)
    f.message_type.add(name="FloatList").field.add(
        name="value", number=1, label=repeated, type=_FIELD.TYPE_FLOAT, options=packed
    )
    f.message_type.add(name="Int64List").field.add(
        name="value", number=1, label=repeated, type=_FIELD.TYPE_INT64, options=packed
    )
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, kind) in enumerate(
        [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")], start=1
    ):
        feature.field.add(
            name=name,
            number=number,
            label=optional,
            type=_FIELD.TYPE_MESSAGE,
            type_name=f".tensorflow.{kind}",
            oneof_index=0,
        )
    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry", options=descriptor_pb2.MessageOptions(map_entry=True))
    entry.field.add(name="key", number=1, label=optional, type=_FIELD.TYPE_STRING)
    entry.field.add(name="value", number=2, label=optional, type=_FIELD.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    features.field.add(
        name="feature",
        number=1,
        label=repeated,
        type=_FIELD.TYPE_MESSAGE,
        type_name=".tensorflow.Features.FeatureEntry",
    )
    f.message_type.add(name="Example").field.add(
        name="features", number=1, label=optional, type=_FIELD.TYPE_MESSAGE, type_name=".tensorflow.Features"
    )
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_example_file_proto())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))
Feature = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Feature"))

# ---------------------------------------------------------------- TFRecord framing

MASK_DELTA = 0xA282EAD8  # tensorflow core/lib/hash/crc32c.h kMaskDelta
HEADER = struct.Struct("<QI")  # length, masked crc32c(length bytes)
FOOTER = struct.Struct("<I")  # masked crc32c(data)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C that TFRecord stores after the length and after the data."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


class CorruptRecordError(Exception):
    """A TFRecord record that failed its checksum or was cut short, or an undecodable episode.

    `recoverable` is True when the framing is intact (bad data checksum, bad Example), so the next
    record can still be read; False when the rest of the file cannot be located (bad length
    checksum, truncated file)."""

    def __init__(self, path: str | Path, index: int, offset: int | None, reason: str, recoverable: bool):
        self.path, self.index, self.offset = Path(path), index, offset
        self.reason, self.recoverable = reason, recoverable
        where = f"record {index}" + (f" at byte {offset}" if offset is not None else "")
        super().__init__(f"{self.path.name}: {where}: {reason}")

    def as_dict(self) -> dict:
        return {"file": self.path.name, "record": self.index, "offset": self.offset, "reason": self.reason}


def frame_record(data: bytes) -> bytes:
    """One record in TFRecord framing: length, its masked CRC, the data, the data's masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + FOOTER.pack(masked_crc32c(length)) + data + FOOTER.pack(masked_crc32c(data))


def write_tfrecord(path: str | Path, records: Iterable[bytes]) -> int:
    """Write `records` to an uncompressed TFRecord file (as `tf.io.TFRecordWriter` does); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "wb") as f:
        for record in records:
            f.write(frame_record(record))
            count += 1
    return count


class _FramingError(Exception):
    def __init__(self, reason: str, recoverable: bool):
        super().__init__(reason)
        self.reason, self.recoverable = reason, recoverable


def _next_record(f, remaining: int) -> bytes:
    """Read one framed record at the file position; raises `_FramingError` describing what is wrong."""
    header = f.read(HEADER.size)
    if len(header) < HEADER.size:
        raise _FramingError(f"truncated header ({len(header)} of {HEADER.size} bytes)", recoverable=False)
    length, length_crc = HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise _FramingError("length checksum mismatch", recoverable=False)
    if length + HEADER.size + FOOTER.size > remaining:
        raise _FramingError(f"truncated: record of {length} bytes, {remaining - HEADER.size} left", recoverable=False)
    data = f.read(length)
    (data_crc,) = FOOTER.unpack(f.read(FOOTER.size))
    if masked_crc32c(data) != data_crc:
        raise _FramingError(f"data checksum mismatch ({length} bytes)", recoverable=True)
    return data


def read_tfrecord(path: str | Path, on_corrupt: Callable[[CorruptRecordError], None] | None = None) -> Iterator[bytes]:
    """The records of an uncompressed TFRecord file, every checksum verified.

    A damaged record raises `CorruptRecordError` when `on_corrupt` is None. Otherwise it is passed to
    `on_corrupt` and reading goes on with the next record when the framing allows (bad data
    checksum) or ends for this file (bad length checksum, truncated tail)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        index = 0
        while (offset := f.tell()) < size:
            try:
                data = _next_record(f, size - offset)
            except _FramingError as damage:
                err = CorruptRecordError(path, index, offset, damage.reason, damage.recoverable)
                if on_corrupt is None:
                    raise err from None
                on_corrupt(err)
                if not damage.recoverable:
                    return
            else:
                yield data
            index += 1


# ---------------------------------------------------------------- episodes

IMAGE_KEY = "steps/observation/image"
INSTRUCTION_KEY = "steps/observation/natural_language_instruction"
ACTION_WIDTHS = {"world_vector": 3, "rotation_delta": 3, "gripper_closedness_action": 1, "terminate_episode": 3}
FLAG_NAMES = ("is_first", "is_last", "is_terminal")
SUCCESS_KEY = "aspects/success"
BOOL_PREFIXES = ("aspects/",)  # every aspects/* feature is a bool in the TFDS spec (stored as int64)


class MalformedEpisodeError(ValueError):
    """Record bytes that are not a `tf.train.Example` of an RT-1 episode (missing key, wrong length)."""


@dataclass
class Episode:
    """One RT-1 episode of T steps. `actions` holds float32 arrays `world_vector` (T, 3),
    `rotation_delta` (T, 3), `gripper_closedness_action` (T, 1) and `terminate_episode` (T, 3, one-hot);
    `metadata` every episode-level feature by its flattened key (e.g. `aspects/success`: bool,
    `attributes/task_family_name`: str)."""

    frames: list[bytes]  # T encoded images (JPEG, 256x320 in the release)
    instruction: str
    actions: dict[str, np.ndarray]
    is_first: np.ndarray  # (T,) bool
    is_last: np.ndarray  # (T,) bool
    is_terminal: np.ndarray  # (T,) bool
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.frames)

    @property
    def success(self) -> bool | None:
        """`aspects/success` (the crowd-rated outcome), None when the record has no such feature."""
        value = self.metadata.get(SUCCESS_KEY)
        return None if value is None else bool(value)


def _values(feature) -> tuple[str | None, list]:
    kind = feature.WhichOneof("kind")
    return kind, (list(getattr(feature, kind).value) if kind else [])


def _step_array(features, key: str, width: int, num_steps: int) -> np.ndarray:
    """A per-step numeric feature as float32 (T, width); int64 and float lists are both accepted."""
    if key not in features:
        raise MalformedEpisodeError(f"missing feature {key!r}")
    kind, values = _values(features[key])
    if kind not in ("float_list", "int64_list"):
        raise MalformedEpisodeError(f"feature {key!r} is {kind}, expected float_list or int64_list")
    if len(values) != num_steps * width:
        raise MalformedEpisodeError(f"feature {key!r} has {len(values)} values, expected {num_steps} steps x {width}")
    return np.asarray(values, dtype=np.float32).reshape(num_steps, width)


def _metadata_value(key: str, kind: str | None, values: list) -> Any:
    if kind == "bytes_list":
        values = [v.decode("utf-8", errors="replace") for v in values]
    elif kind == "int64_list" and key.startswith(BOOL_PREFIXES):
        values = [bool(v) for v in values]
    return values[0] if len(values) == 1 else values


def parse_episode(record: bytes) -> Episode:
    """Decode one record (a serialized `tf.train.Example`) into an `Episode`; `MalformedEpisodeError` if not one."""
    try:
        features = Example.FromString(record).features.feature
    except DecodeError as err:
        raise MalformedEpisodeError(f"not a tf.train.Example: {err}") from None
    if IMAGE_KEY not in features or features[IMAGE_KEY].WhichOneof("kind") != "bytes_list":
        raise MalformedEpisodeError(f"missing bytes feature {IMAGE_KEY!r}")
    frames = list(features[IMAGE_KEY].bytes_list.value)
    if not frames:
        raise MalformedEpisodeError(f"{IMAGE_KEY!r} is empty (an episode needs at least one step)")
    num_steps = len(frames)
    instructions = _values(features[INSTRUCTION_KEY])[1] if INSTRUCTION_KEY in features else []
    # the instruction is repeated on every step of an RT-1 episode; the first one stands for all
    instruction = instructions[0].decode("utf-8", errors="replace") if instructions else ""
    actions = {
        name: _step_array(features, f"steps/action/{name}", width, num_steps) for name, width in ACTION_WIDTHS.items()
    }
    flags = {name: _step_array(features, f"steps/{name}", 1, num_steps)[:, 0] != 0 for name in FLAG_NAMES}
    metadata = {
        key: _metadata_value(key, *_values(features[key])) for key in sorted(features) if not key.startswith("steps/")
    }
    return Episode(frames=frames, instruction=instruction, actions=actions, **flags, metadata=metadata)


def _set_metadata(feature, key: str, value: Any) -> None:
    values = value if isinstance(value, list | tuple) else [value]
    if all(isinstance(v, bool | int | np.integer | np.bool_) for v in values):
        feature.int64_list.value.extend(int(v) for v in values)
    elif all(isinstance(v, float | np.floating) for v in values):
        feature.float_list.value.extend(float(v) for v in values)
    elif all(isinstance(v, str) for v in values):
        feature.bytes_list.value.extend(v.encode() for v in values)
    else:
        raise ValueError(f"metadata {key!r}: cannot store {value!r} (bool/int, float or str values)")


def write_episode_record(episode: Episode) -> bytes:
    """The serialized `tf.train.Example` of `episode`, laid out as the RLDS release stores it."""
    num_steps = episode.num_steps
    example = Example()
    features = example.features.feature
    features[IMAGE_KEY].bytes_list.value.extend(episode.frames)
    features[INSTRUCTION_KEY].bytes_list.value.extend([episode.instruction.encode()] * num_steps)
    for name, width in ACTION_WIDTHS.items():
        array = np.asarray(episode.actions[name], dtype=np.float32)
        if array.shape != (num_steps, width):
            raise ValueError(f"actions[{name!r}] has shape {array.shape}, expected ({num_steps}, {width})")
        target = features[f"steps/action/{name}"]
        if name == "terminate_episode":  # int32 one-hot in the TFDS spec -> int64 list
            target.int64_list.value.extend(int(v) for v in np.rint(array).ravel())
        else:
            target.float_list.value.extend(array.ravel().tolist())
    for name in FLAG_NAMES:
        flags = np.asarray(getattr(episode, name), dtype=bool)
        if flags.shape != (num_steps,):
            raise ValueError(f"{name} has shape {flags.shape}, expected ({num_steps},)")
        features[f"steps/{name}"].int64_list.value.extend(int(v) for v in flags)
    for key, value in episode.metadata.items():
        if key.startswith("steps/"):
            raise ValueError(f"metadata key {key!r} must not start with 'steps/'")
        _set_metadata(features[key], key, value)
    return example.SerializeToString(deterministic=True)
