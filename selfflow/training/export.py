"""`selfflow export`: a run's EMA (and optionally student) weights as one consolidated safetensors file.

The file holds fp32 weights under the model's own parameter names plus the model config and
step in its metadata, so sampling and evaluation load it with plain PyTorch (no DeepSpeed,
no process group). Only a checkpoint whose every file matches its manifest (size and sha256) is
read, and DeepSpeed's files only through the weights-only unpickler:

    selfflow export --run runs/tiny --out exports/tiny.safetensors [--student]
    model, meta = load_export("exports/tiny.safetensors")
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from selfflow.backbone.checkpoint import load_export  # noqa: F401  (re-exported: the reader of what export writes)
from selfflow.backbone.mmdit import MMDiTConfig
from selfflow.backbone.sit import SiTConfig
from selfflow.config import load_config
from selfflow.training import checkpoints
from selfflow.training.engine import consolidated_student


@dataclass
class _ModelSection:
    model: MMDiTConfig | SiTConfig = field(default_factory=MMDiTConfig)  # by `kind`, as in the run's config


def run_model_config(path: Path) -> MMDiTConfig | SiTConfig:
    """The `model` section of a run's saved config (an MMDiT or a SiT), checked like any config file."""
    section = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(section, dict):
        raise ValueError(f"{path} has no model section")
    overrides = [f"model.{key}={json.dumps(value)}" for key, value in section.items()]
    return load_config(_ModelSection, None, overrides).model


def newest_verified(run_dir: Path) -> Path:
    """The newest checkpoint of `run_dir` whose files all match its manifest; the others are named."""
    refused = []
    for folder in checkpoints.step_folders(run_dir):
        try:
            checkpoints.verify(folder)
        except (ValueError, OSError) as err:
            refused.append(f"{folder.name}: {err}")
            continue
        for line in refused:
            print(f"export: skipped {line}")
        return folder
    listing = "".join(f"\n  {line}" for line in refused)
    raise FileNotFoundError(f"no complete checkpoint in {checkpoints.checkpoint_root(run_dir)}{listing}")


def export(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None, student: bool = False) -> Path:
    """Write `out` (EMA) and, with `student`, `out` with a `.student` suffix; returns the EMA file."""
    folder = Path(checkpoint) if checkpoint else newest_verified(Path(run_dir))
    try:
        checkpoints.verify(folder)  # every file against the manifest before anything is read
    except (ValueError, OSError) as err:
        raise ValueError(f"checkpoint {folder} is not usable: {err}") from None
    # the run's own resolved model config (pretraining and robotics finetuning runs both hold `model`)
    model_cfg = run_model_config(folder / "config.yaml")
    meta = {
        "format": "selfflow-export-1",
        "model_config": json.dumps(asdict(model_cfg)),
        "step": str(checkpoints.read_state(folder)["step"]),
        "source": str(folder),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(folder / "ema.safetensors")), str(out), metadata={**meta, "weights": "ema"})
    out.with_suffix(".yaml").write_text(yaml.safe_dump(asdict(model_cfg), sort_keys=False))
    if student:
        path = out.with_name(out.stem + ".student.safetensors")
        save_file(consolidated_student(folder), str(path), metadata={**meta, "weights": "student"})
    return out
