"""`selfflow export`: a run's EMA (and optionally student) weights as one consolidated safetensors file.

The file holds fp32 weights under the model's own parameter names plus the model config and
step in its metadata, so sampling and evaluation load it with plain PyTorch (no DeepSpeed,
no process group). Only a checkpoint whose every file matches its manifest (size and sha256) is
read, and DeepSpeed's files only through the weights-only unpickler:

    selfflow export --run runs/tiny --out exports/tiny.safetensors [--student]
    model, meta = load_export("exports/tiny.safetensors")

Beside the file it writes a model folder (`exports/tiny/`, or `--folder`) laid out as Hugging Face
model folders are, which `selfflow.pipeline.SelfFlowPipeline.from_pretrained(folder)` and
`selfflow generate --model folder` load with no network and no run folder:

    config.json        {"format": "selfflow-model-1", "model": the trunk config, "step", "weights", "text": ...}
    model.safetensors  the EMA weights (fp32), the same file as the export
    modalities.json    per modality: the autoencoder config (kind, local path, patch), latent and token shape
    text/spm.model     the sentencepiece model of the captions (a text-encoder folder is referenced by path)
    stats/<name>.json  latent statistics of an Oobleck modality
    training.yaml      the run's resolved training config
    README.md          the model card: model, data summary, training config, latest evaluation table
"""

import json
import shutil
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


def export(
    run_dir: str | Path,
    out: str | Path,
    checkpoint: str | Path | None = None,
    student: bool = False,
    folder_out: str | Path | None = None,
) -> Path:
    """Write `out` (EMA), with `student` also `out` with a `.student` suffix, and the model folder
    (`folder_out`, default `out` without its suffix); returns the EMA file."""
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
    write_model_folder(Path(folder_out) if folder_out else out.with_suffix(""), out, folder, Path(run_dir), model_cfg)
    return out


def write_model_folder(dest: Path, weights: Path, checkpoint: Path, run_dir: Path, model_cfg) -> Path:
    """The shareable folder (see the module's docstring) for the exported `weights` of `checkpoint`."""
    from selfflow import __version__
    from selfflow.data.loader import REMOTE, read_manifest

    train_cfg = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, dest / "model.safetensors")
    shutil.copyfile(checkpoint / "config.yaml", dest / "training.yaml")
    modalities, text, data = {}, None, {}
    for name, mix in (train_cfg.get("modalities") or {}).items():
        shards = (mix or {}).get("shards")
        found = read_manifest(shards) if shards else None
        if found is None:
            continue
        where, manifest = found
        entry = manifest.get("modalities", {}).get(name)
        if not entry:
            continue
        adapter = dict(entry["modality"])
        if adapter.get("stats"):  # Oobleck statistics travel with the model
            (dest / "stats").mkdir(exist_ok=True)
            shutil.copyfile(adapter["stats"], dest / "stats" / f"{name}.json")
            adapter["stats"] = f"stats/{name}.json"
        modalities[name] = {
            "modality": adapter,
            "latent_shape": entry["latent_shape"],
            "tokens": entry["tokens"],
            "token_dim": entry["token_dim"],
        }
        data[name] = {
            "count": entry["count"],
            "shards": shards if shards.startswith(REMOTE) else str(Path(shards).resolve()),
            "raw_dir": manifest.get("raw_dir"),
        }
        if text is None and manifest.get("text"):
            text, text_home = manifest["text"], Path(where).parent
    if text and text["config"]["kind"] == "sentencepiece":
        spm = Path(text["config"]["path"])  # as prepare wrote it: relative to where prepare ran, or absolute
        spm = spm if spm.is_file() else text_home / "text" / spm.name  # else in prepare's out_dir
        (dest / "text").mkdir(exist_ok=True)
        shutil.copyfile(spm, dest / "text" / "spm.model")
        text = {**text, "config": {**text["config"], "path": "text/spm.model"}}
    state = checkpoints.read_state(checkpoint)
    config = {
        "format": "selfflow-model-1",
        "selfflow_version": __version__,
        "model": asdict(model_cfg),
        "step": state["step"],
        "weights": "ema",
        "text": text,  # null: no text conditioning
        "objective": train_cfg.get("objective"),
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dest / "modalities.json").write_text(json.dumps(modalities, indent=2) + "\n")
    (dest / "README.md").write_text(model_card(config, modalities, data, train_cfg, latest_eval(run_dir)))
    return dest


def latest_eval(run_dir: Path) -> dict | None:
    """The newest evaluation of the run (`evals/step_N/eval.json`), if it has one."""
    evals = sorted(run_dir.glob("evals/step_*/eval.json"), key=lambda p: int(p.parent.name.split("_")[-1]))
    return json.loads(evals[-1].read_text()) if evals else None


def model_card(config: dict, modalities: dict, data: dict, train_cfg: dict, evaluation: dict | None) -> str:
    """A Markdown model card: what the model is, what it was trained on and how, and how it scored."""
    model = config["model"]
    objective = config.get("objective") or {}
    lines = [
        "---",
        "library_name: selfflow",
        "tags: [self-flow, flow-matching, diffusion-transformer]",
        "---",
        "",
        f"# selfflow {model.get('kind', 'mmdit')} trunk, step {config['step']}",
        "",
        f"Trained with `selfflow` {config['selfflow_version']} ({objective.get('method', 'unknown')} objective), "
        f"EMA weights. Load it with `SelfFlowPipeline.from_pretrained(folder)` or sample from it with "
        f'`selfflow generate --model FOLDER prompt="..." modality=NAME`.',
        "",
        "## Model",
        "",
        "| key | value |",
        "|---|---|",
    ]
    for key in ("kind", "hidden_size", "num_heads", "depth_double", "depth_single", "depth", "context_dim"):
        if key in model:
            lines.append(f"| {key} | {model[key]} |")
    lines += ["", "## Data", "", "| modality | items | autoencoder | patch | latent shape | tokens x width |"]
    lines.append("|---|---|---|---|---|---|")
    for name, entry in modalities.items():
        adapter = entry["modality"]
        lines.append(
            f"| {name} | {data[name]['count']} | {adapter['autoencoder']} {adapter.get('path') or ''} | "
            f"{adapter.get('patch')} | {entry['latent_shape']} | {entry['tokens']} x {entry['token_dim']} |"
        )
    if not modalities:
        lines.append("| (in-memory synthetic latents: no decoder) | | | | | |")
    text = config.get("text")
    lines += ["", f"Text: {text['config']['kind'] if text else 'none'}.", ""]
    if evaluation:
        sampler = evaluation.get("protocol", {}).get("sampler", {})
        how = f"{sampler.get('kind', '?')} {sampler.get('num_steps', '?')} steps, CFG {sampler.get('cfg_scale', '?')}"
        lines += [f"## Evaluation (step {evaluation.get('step', '?')}, {how})", ""]
        lines += ["| modality | metric | value |", "|---|---|---|"]
        for name, metrics in (evaluation.get("metrics") or {}).items():
            for metric, value in metrics.items():
                if isinstance(value, dict) and isinstance(value.get("overall"), int | float):
                    value = value["overall"]  # caption accuracy: the share of stated attributes shown
                if isinstance(value, int | float) and metric != "seconds":
                    lines.append(f"| {name} | {metric} | {value:.4g} |")
        lines.append("")
    lines += ["## Training config", "", "```yaml", yaml.safe_dump(train_cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
