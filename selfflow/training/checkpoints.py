"""Checkpoint folders of a run: completeness markers, the `latest` pointer, pruning, fallback.

    run_dir/checkpoints/step_00000100/   DeepSpeed files of every rank, ema.safetensors,
                                         state.json, config.yaml, then COMPLETE (written last)
    run_dir/checkpoints/latest           name of the newest complete checkpoint

The pointer moves only after a checkpoint is complete (for people and tools; resuming trusts
the markers). A run killed while saving resumes from the previous checkpoint: a folder
without its marker or with missing files is refused with a warning naming it, and the next
older complete one is used.
"""

import json
import os
import shutil
import warnings
from pathlib import Path

MARKER = "COMPLETE"
REQUIRED = ("ema.safetensors", "state.json")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def write_state(folder: Path, state: dict) -> None:
    _atomic_write(folder / "state.json", json.dumps(state, indent=2))


def read_state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def mark_complete(folder: Path) -> None:
    """Seal `folder` and point `latest` at it (rank 0, after every rank finished writing)."""
    _atomic_write(folder / MARKER, "ok\n")
    _atomic_write(checkpoint_root(folder.parent.parent) / "latest", folder.name + "\n")


def problems(folder: Path) -> list[str]:
    """Why `folder` cannot be resumed from (empty when it looks complete)."""
    if not folder.is_dir():
        return ["folder is missing"]
    found = [] if (folder / MARKER).is_file() else [f"no {MARKER} marker (incomplete save)"]
    for name in REQUIRED:
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            found.append(f"{name} missing or empty")
    return found


def candidates(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoints, newest first; incomplete or broken ones are refused by name.

    A complete folder newer than `latest` (a crash between sealing it and moving the pointer)
    is used too: the marker, not the pointer, says a checkpoint is whole.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    folders = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    usable = []
    for folder in folders:
        issues = problems(folder)
        if issues:
            warnings.warn(f"refusing checkpoint {folder}: {'; '.join(issues)}", stacklevel=2)
        else:
            usable.append(folder)
    return usable


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (and incomplete ones older than them)."""
    root = checkpoint_root(run_dir)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    complete = [f for f in folders if not problems(f)]
    keep_set = set(complete[:keep])
    oldest_kept = min(keep_set, default=None)
    for folder in folders:
        if folder in keep_set or (oldest_kept is not None and folder.name > oldest_kept.name):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
