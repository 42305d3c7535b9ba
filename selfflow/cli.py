"""The `selfflow` command line: one sub-command per job.

    selfflow synth --config configs/data/synth.yaml num_images=256
    selfflow pack src=~/photos out_dir=data/mine/raw image_size=256
    selfflow prepare --config configs/data/prepare_tiny.yaml workers=4
    selfflow generate --model runs/demo/export/ema prompt="a red circle moving right" modality=video
    selfflow sample --config configs/sample/tiny.yaml sampler.num_steps=20 out_dir=outputs/demo
    selfflow eval checkpoint=runs/demo/export/ema.safetensors eval.num_samples=64
    selfflow sample --help        # options and every config key with its default

Every job takes `--config PRESET.yaml` plus `key.sub=value` overrides and writes its resolved
config next to its outputs.
"""

import argparse
import hashlib
import json
import sys
import textwrap
from pathlib import Path

from selfflow.config import ConfigError, config_keys, load_config


def _keys_epilog(cls: type, verb: str) -> str:
    """Every config key with its type, default and what its field's comment says."""
    rows = config_keys(cls)
    width = max(len(k) for k, *_ in rows)
    lines = ["config keys (override with key=value):"]
    for key, kind, default, comment in rows:
        lines.append(f"  {key:<{width}}  {kind:<22} default: {default!r}")
        lines += [f"      {line}" for line in textwrap.wrap(comment, 96)]
    scalars = [(k, d) for k, kind, d, _ in rows if kind in ("int", "str", "bool") and d not in ("", None, "(required)")]
    key, value = next(((k, d) for k, d in scalars if isinstance(d, int)), scalars[0] if scalars else ("seed", 1))
    example = f"{key}={str(value).lower() if isinstance(value, bool) else value}"
    lines += ["", f"example: selfflow {verb} --config PRESET.yaml {example}"]
    return "\n".join(lines)


# The key listings of every verb's `--help`, written by `make help-keys` (which `make test` runs) for
# the exact source they were built from: building one imports the verb's modules, torch included
# (1.5-2 s), reading it takes milliseconds. Used only while `source_digest()` matches, so it is never
# stale: after any change to the package's code `--help` builds the listing from the classes again.
HELP_KEYS = Path(__file__).with_name("help_keys.json")


def source_digest() -> str:
    """sha256 over the package's Python sources (names and contents)."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _epilog(job: str) -> str:
    """The key listing of `job`'s help: from `HELP_KEYS` when it was written for this source, else built."""
    try:
        cached = json.loads(HELP_KEYS.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and cached.get("source") == source_digest() and job in cached.get("epilogs", {}):
        return cached["epilogs"][job]
    return _keys_epilog(_job_config(job), job)


def write_help_keys() -> Path:
    """Write `HELP_KEYS` for every verb with a config (`make help-keys`)."""
    jobs = [*DESCRIPTIONS, *(f"robotics {job}" for job in ROBOTICS)]
    epilogs = {job: _keys_epilog(_job_config(job), job) for job in jobs}
    HELP_KEYS.write_text(json.dumps({"source": source_digest(), "epilogs": epilogs}, indent=1) + "\n")
    return HELP_KEYS


def _job_config(job: str) -> type:
    """The config class a job reads; each job's modules are imported only when that job runs."""
    if job == "synth":
        from selfflow.data.synth import SynthConfig

        return SynthConfig
    if job == "pack":
        from selfflow.data.pack import PackConfig

        return PackConfig
    if job == "prepare":
        from selfflow.data.prepare import PrepareConfig

        return PrepareConfig
    if job == "generate":
        from selfflow.pipeline import GenerateConfig

        return GenerateConfig
    if job == "sample":
        from selfflow.eval.sample import SampleConfig

        return SampleConfig
    if job == "eval":
        from selfflow.eval.evaluate import EvalJobConfig

        return EvalJobConfig
    if job == "report":
        from selfflow.eval.report import ReportConfig

        return ReportConfig
    if job == "robotics convert":
        from selfflow.robotics.convert import ConvertConfig

        return ConvertConfig
    if job == "robotics finetune":
        from selfflow.robotics.finetune import FinetuneConfig

        return FinetuneConfig
    if job == "robotics eval-simpler":
        from selfflow.robotics.agent import EvalSimplerConfig

        return EvalSimplerConfig
    from selfflow.pretrain import PretrainConfig

    return PretrainConfig


DESCRIPTIONS = {
    "synth": (
        "generate the built-in captioned image / video / audio dataset as raw webdataset shards",
        "Generate captioned coloured shapes (PNG), moving shapes (mp4) and synthesised notes (FLAC/WAV)\n"
        "from a seed as raw webdataset shards out_dir/{image,video,audio}/shard-*.tar plus manifest.json.\n"
        "Nothing is downloaded; the same config gives the same items.",
    ),
    "pack": (
        "your folder of images / videos / audio with captions -> raw webdataset shards for prepare",
        "Walk src for image / video / audio files (by extension); caption each from a CSV / JSONL\n"
        "(captions=FILE), a sidecar <stem>.txt, or its class folder (class_folders=true, labels numbered\n"
        "as ImageFolder does); resize / centre-crop, resample, cut to the limits; write\n"
        "out_dir/<modality>/shard-*.tar in the layout `selfflow prepare` reads. Files too large, without\n"
        "a caption or that do not decode are skipped and counted by reason in out_dir/summary.json.",
    ),
    "prepare": (
        "encode raw webdataset shards into the latent shards that training reads",
        "Train a sentencepiece model on all captions, then encode raw_dir/<modality>/*.tar with each\n"
        "modality's autoencoder in worker processes into out_dir/<modality>/latent-*.tar (latent tokens,\n"
        "ids, text ids). Corrupt samples and shards are skipped and counted with their keys in\n"
        "out_dir/summary.json; out_dir/manifest.json describes the token shapes and shards.",
    ),
    "generate": (
        "sample from an exported model folder with a prompt (or class label): PNG / MP4 / WAV",
        "Load a model folder written by `selfflow export` (weights, trunk config, sentencepiece model,\n"
        "autoencoder configs; nothing is downloaded), sample num_samples items for the prompt with the\n"
        "sampler (Euler 50, no guidance by default; sample i seeded by (seed, i) as in `selfflow eval`),\n"
        "decode them and write out_dir/<modality>-<seed>-<i>.png|mp4|wav, each with a .json sidecar\n"
        "(prompt, label, sampler, steps, CFG, seed, model, step; PNGs also carry it in a text chunk).",
    ),
    "sample": (
        "draw class-conditional samples from a SiT checkpoint (PNGs + ADM .npz)",
        "Draw N class-conditional samples from a local SiT checkpoint (or a random model when none is\n"
        "given), decode them with a local SD-VAE folder, and write PNGs, an ADM-evaluator .npz\n"
        "(arr_0, uint8 NHWC) and the resolved config to out_dir. Sample i is seeded by (seed, i),\n"
        "so results do not depend on batch size or process count; run under torchrun for multi-GPU.",
    ),
    "eval": (
        "sample captioned items per modality from an export and compute that modality's metrics",
        "Sample num_samples items per modality from a `selfflow export` file, conditioned on the captions\n"
        "of the first items of the prepared data (sample i seeded by (seed, i)), decode them, and score\n"
        "them against those items: built-in FD and caption-following accuracy everywhere, FVD for video,\n"
        "and FID / sFID / IS / precision / recall / FD-DINO / CLIP score / FAD where local weights of the\n"
        "standard networks are given. Writes out_dir/eval.json (every number, the protocol, weights'\n"
        "sha256, the checkpoint step) and sample pictures, GIFs and WAVs.",
    ),
    "report": (
        "turn runs and evaluations into an HTML page and a Markdown file (tables, plots, samples)",
        "Collect runs (metrics.jsonl, evals/*/eval.json) or evaluation folders (eval.json) into\n"
        "out_dir/report.html and report.md: metric tables per modality, caption accuracy per attribute,\n"
        "loss curves and metric-vs-step plots, image grids, GIF videos and audio players. With mlflow=true\n"
        "the folder is also logged as artifacts of each training run's MLflow run.",
    ),
    "train": (
        "train the MMDiT trunk with Self-Flow / flow matching / REPA through DeepSpeed",
        "Train the shared MMDiT trunk: each step draws one modality, noises it with dual timesteps\n"
        "and trains student + EMA teacher (objective.method selects Self-Flow, vanilla flow matching\n"
        "or REPA). Checkpoints go to run_dir/checkpoints; an existing run folder is resumed. Launch\n"
        "one process directly, or many with torchrun / the deepspeed launcher / srun.",
    ),
}


ROBOTICS = {
    "convert": (
        "RT-1 RLDS TFRecord episodes -> webdataset clip shards plus action statistics",
        "Read Open X-Embodiment fractal20220817_data TFRecords without TensorFlow (CRC-checked framing,\n"
        "tf.train.Example parsed with protobuf) and write clip shards (context frames, future frames,\n"
        "action chunk, instruction) to out_dir with stats.json and summary.json. Corrupt records are\n"
        "skipped and counted.",
    ),
    "finetune": (
        "video-action finetuning of a pretrained trunk on converted clips",
        "Load a `selfflow export` (missing action projections initialised, the load report printed) and\n"
        "train frames + action chunks jointly: observed frames at t = 0, future frames and actions with\n"
        "their own timesteps, Self-Flow's masking and representation loss by config, through DeepSpeed\n"
        "with EMA, checkpoints and MLflow like `selfflow train`.",
    ),
    "eval-simpler": (
        "evaluate a finetuned trunk as a policy in the SIMPLER Google-robot tasks",
        "Check that simpler_env imports and a Vulkan GPU exists (exit 2 with a plain message if not), then\n"
        "run the tasks (Move Near, open top drawer and place apple; all Google-robot tasks by option) with\n"
        "visual-matching settings, writing per-episode JSON, an mp4 per episode and success rates.",
    ),
}


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset (see configs/); defaults fill the keys it leaves out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=1")


def package_version() -> str:
    """The installed distribution's version (pyproject.toml)."""
    from selfflow import __version__

    return __version__


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """All verbs; the config-key listing is built only for the verb being run (its `--help`)."""
    parser = argparse.ArgumentParser(prog="selfflow", description="Self-Flow: self-supervised flow matching.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="job", required=True)
    for job, (help_text, description) in DESCRIPTIONS.items():
        job_parser = sub.add_parser(
            job,
            help=help_text,
            description=description,
            epilog=_epilog(job) if job == selected else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_job_arguments(job_parser)
        if job == "generate":
            job_parser.add_argument("--model", help="the model folder `selfflow export` wrote (same as model=...)")
        if job == "train":
            job_parser.add_argument(
                "--resume", action="store_true", help="require a checkpoint in run_dir to continue from (error if none)"
            )
            job_parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed
    robotics = sub.add_parser("robotics", help="RT-1 conversion, video-action finetuning, SIMPLER evaluation")
    robotics_sub = robotics.add_subparsers(dest="robotics_job", required=True)
    for job, (help_text, description) in ROBOTICS.items():
        job_parser = robotics_sub.add_parser(
            job,
            help=help_text,
            description=description,
            epilog=_epilog(name) if selected == (name := f"robotics {job}") else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_job_arguments(job_parser)
        if job == "finetune":
            job_parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    exp = sub.add_parser(
        "export",
        help="write a run's EMA (and student) weights as one safetensors file plus the model config",
        description="Consolidate a training checkpoint (any ZeRO stage, no processes needed) into a\n"
        "safetensors file of fp32 EMA weights with the model config in its metadata and a .yaml beside it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exp.add_argument("--run", required=True, help="run folder (its latest complete checkpoint is used)")
    exp.add_argument("--checkpoint", help="a specific checkpoint folder instead of the latest")
    exp.add_argument("--out", required=True, help="output .safetensors path")
    exp.add_argument("--student", action="store_true", help="also write OUT.student.safetensors (online weights)")
    exp.add_argument("--folder", help="the shareable model folder (default: OUT without its suffix)")
    return parser


def run_robotics(args: argparse.Namespace) -> int:
    cfg = load_config(_job_config(f"robotics {args.robotics_job}"), args.config, args.overrides)
    if args.robotics_job == "convert":
        from selfflow.robotics.convert import convert

        summary = convert(cfg)
        print(f"wrote {summary['clips_written']} clips to {cfg.out_dir} ({cfg.out_dir}/summary.json)")
        return 0
    if args.robotics_job == "finetune":
        from selfflow.robotics.finetune import finetune

        print(f"finetuned into {finetune(cfg)}")
        return 0
    from selfflow.robotics.agent import eval_simpler

    return eval_simpler(cfg)


def run_job(args: argparse.Namespace) -> int:
    if args.job == "robotics":
        return run_robotics(args)
    if args.job == "export":
        from selfflow.training.export import export

        out = export(args.run, args.out, args.checkpoint, args.student, args.folder)
        print(f"wrote {out} and the model folder {Path(args.folder) if args.folder else out.with_suffix('')}")
        return 0
    overrides = list(args.overrides)
    if getattr(args, "model", None):  # generate --model FOLDER
        overrides.insert(0, f"model={args.model}")
    cfg = load_config(_job_config(args.job), args.config, overrides)
    if args.job == "synth":
        from selfflow.data.synth import synth

        manifest = synth(cfg)
        counts = ", ".join(f"{m['count']} {name}" for name, m in manifest["modalities"].items())
        print(f"wrote {counts} items ({manifest['bytes'] / 1e6:.1f} MB) to {cfg.out_dir}")
    elif args.job == "pack":
        from selfflow.data.pack import pack

        pack(cfg)
    elif args.job == "prepare":
        from selfflow.data.prepare import prepare

        prepare(cfg)
    elif args.job == "generate":
        from selfflow.pipeline import run_generate

        for path in run_generate(cfg):
            print(f"wrote {path}")
    elif args.job == "sample":
        from selfflow.eval.sample import run_sample

        run_sample(cfg)
    elif args.job == "eval":
        from selfflow.eval.evaluate import run_eval

        if Path(cfg.checkpoint).is_dir():  # a run folder: export its latest complete checkpoint first
            from selfflow.training.export import export

            cfg.checkpoint = str(export(cfg.checkpoint, Path(cfg.out_dir) / "export" / "ema.safetensors"))
        print(f"wrote {run_eval(cfg)}")
    elif args.job == "report":
        from selfflow.eval.report import write_report

        print(f"report: {write_report(cfg)}")
    else:
        from selfflow.pretrain import pretrain
        from selfflow.training import checkpoints

        if args.resume and not checkpoints.step_folders(cfg.run_dir):
            raise FileNotFoundError(f"--resume: no checkpoint in {checkpoints.checkpoint_root(cfg.run_dir)}")
        pretrain(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = " ".join(argv[:2]) if argv[:1] == ["robotics"] else (argv[0] if argv else None)
    args = build_parser(selected).parse_args(argv)
    try:
        return run_job(args)
    except (ConfigError, FileNotFoundError, ValueError, ArithmeticError, OSError) as err:
        # ArithmeticError: a non-finite training loss (NonFiniteLossError names step, modality and term)
        print(f"selfflow {args.job}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from selfflow.training.checkpoints import CheckpointError
        from selfflow.training.run import RunError

        if not isinstance(err, RunError | CheckpointError):
            raise
        print(f"selfflow {args.job}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
