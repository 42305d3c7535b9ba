"""Checkpoint folders of a run: the integrity manifest, verification, `latest`, moving aside, pruning.

    run_dir/checkpoints/step_00000100/   DeepSpeed files of every rank, ema.safetensors, state.json,
                                         config.yaml, then COMPLETE (the manifest, written last)
    run_dir/checkpoints/latest           name of the newest complete checkpoint
    run_dir/checkpoints/refused/         checkpoints moved aside: damaged, unfinished, or newer than
                                         the one a run resumed from (never deleted by selfflow)
    run_dir/previous/<time>/             what `resume=false` moved out of the way

`COMPLETE` is JSON: the format, step, world size, ZeRO stage, the run's id and the size and
sha256 of every file of the folder. It is written (atomically, after every file was fsynced)
only when every rank finished writing, so its presence means the checkpoint is whole and its
contents say what whole is. A file that differs from it (a bit flip, a truncated copy, a planted
replacement), a file it does not list, or a damaged manifest makes the folder unusable, and the
reason names the file. Only checkpoints of the same run id are ever pruned.

This module is plain file handling: which folder to use is decided by every rank together in
`run.py`.
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

from selfflow.files import atomic_write, file_sha256

MANIFEST = "COMPLETE"
FORMAT = "selfflow-checkpoint-1"
REQUIRED = ("ema.safetensors", "state.json", "config.yaml")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a run folder holds checkpoints none of which can be used."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every `step_*` folder of the run, newest first (complete or not)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name)), reverse=True)


def hash_file(path: Path) -> dict:
    """Size and sha256 of a file, after flushing it to the disk (fsync)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(folder: Path, files: dict[str, dict], meta: dict) -> None:
    """Seal `folder`: the manifest of `files` (name -> size, sha256) plus `meta`, written last."""
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise CheckpointError(f"{folder}: cannot seal without {missing}")
    atomic_write(folder / MANIFEST, json.dumps({"format": FORMAT, **meta, "files": files}, indent=1, sort_keys=True))


def read_manifest(folder: Path) -> dict:
    """The parsed manifest; a `ValueError` says why there is none or why it cannot be trusted."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} manifest (a save that did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        if path.read_bytes().strip() == b"ok":
            raise ValueError(f"{MANIFEST} has no file list (written by selfflow < 0.2; cannot be verified)") from None
        raise ValueError(f"{MANIFEST} is damaged ({err})") from None
    known = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if not known or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} is damaged or of an unknown format")
    return manifest


def rank_files(names: list[str], rank: int | None) -> list[str]:
    """The files one rank reads on resume: shared ones plus its own `zero_pp_rank_<rank>_*` (None: all)."""
    if rank is None:
        return list(names)
    own = []
    for name in names:
        found = _RANK_FILE.search(name)
        if found is None or int(found.group(1)) == rank:
            own.append(name)
    return own


def verify(folder: Path, rank: int | None = None) -> dict:
    """The manifest of `folder` after checking the files `rank` reads (all with None) against it.

    Raises `ValueError` naming the first problem: no or damaged manifest, a missing, resized or
    altered file, or a file the manifest does not list.
    """
    manifest = read_manifest(folder)
    listed = manifest["files"]
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise ValueError(f"{extra[0]} is not in the manifest (planted or left by another save)")
    for name in rank_files(sorted(listed), rank):
        path, want = folder / name, listed[name]
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        size = path.stat().st_size
        if size != want.get("size"):
            raise ValueError(f"{name} has {size} bytes, the manifest says {want.get('size')}")
        if file_sha256(path) != want.get("sha256"):
            raise ValueError(f"{name} differs from the manifest (sha256 mismatch)")
    return manifest


def write_state(folder: Path, state: dict) -> None:
    atomic_write(folder / "state.json", json.dumps(state, indent=2))


def read_state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def set_latest(run_dir: str | Path, folder: Path) -> None:
    """Point `latest` at `folder` (only ever at a sealed checkpoint)."""
    atomic_write(checkpoint_root(run_dir) / "latest", folder.name + "\n")


def move_aside(folder: Path, why: str) -> Path:
    """Move a checkpoint folder to `checkpoints/refused/` (a new name if taken); never deletes."""
    refused = folder.parent / "refused"
    refused.mkdir(exist_ok=True)
    target, n = refused / folder.name, 1
    while target.exists():
        target, n = refused / f"{folder.name}.{n}", n + 1
    os.replace(folder, target)
    target.with_name(target.name + ".why.txt").write_text(why + "\n")  # beside it: the folder stays verifiable
    return target


def move_run_aside(run_dir: str | Path) -> Path | None:
    """`resume=false`: move the checkpoints, metrics and evaluations of an earlier run to `previous/<time>/`."""
    run_dir = Path(run_dir)
    parts = [run_dir / name for name in ("checkpoints", "metrics.jsonl", "evals", "mlflow_run.json")]
    parts = [p for p in parts if p.exists()]
    if not parts:
        return None
    target = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    n = 1
    while target.exists():
        target, n = target.with_name(f"{target.name}.{n}"), n + 1
    target.mkdir(parents=True)
    for part in parts:
        os.replace(part, target / part.name)
    return target


def prune(run_dir: str | Path, keep: int, run_uid: str) -> list[Path]:
    """Delete sealed checkpoints of run `run_uid` older than its newest `keep`; returns what went.

    Folders without a readable manifest or of another run id are never touched.
    """
    own = []
    for folder in step_folders(run_dir):
        try:
            manifest = read_manifest(folder)
        except (ValueError, OSError):
            continue
        if manifest.get("run_uid") == run_uid:
            own.append(folder)
    for folder in own[keep:]:
        shutil.rmtree(folder)
    return own[keep:]
