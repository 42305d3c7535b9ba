"""The `selfflow` command line: one sub-command per job.

    selfflow sample --config configs/sample/tiny.yaml sampler.num_steps=20 out_dir=outputs/demo
    selfflow sample --help        # options and every config key with its default

Every job takes `--config PRESET.yaml` plus `key.sub=value` overrides and writes its resolved
config next to its outputs.
"""

import argparse
import sys

from selfflow.config import ConfigError, config_keys, load_config


def _keys_epilog(cls: type) -> str:
    rows = config_keys(cls)
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (override with key=value):"]
    lines += [f"  {k:<{width}}  {t:<22} default: {d!r}" for k, t, d in rows]
    return "\n".join(lines)


def _add_job(sub, name: str, help_text: str, description: str, cls: type) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=_keys_epilog(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML preset (see configs/); defaults are used for keys it leaves out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampler.num_steps=50")
    return parser


def main(argv: list[str] | None = None) -> int:
    from selfflow.eval.sample import SampleConfig, run_sample
    from selfflow.training import checkpoints
    from selfflow.training.train import NonFiniteLossError, TrainConfig, train

    parser = argparse.ArgumentParser(prog="selfflow", description="Self-Flow: self-supervised flow matching.")
    sub = parser.add_subparsers(dest="job", required=True)
    _add_job(
        sub,
        "sample",
        "draw class-conditional samples from a SiT checkpoint (PNGs + ADM .npz)",
        "Draw N class-conditional samples from a local SiT checkpoint (or a random model when none is\n"
        "given), decode them with a local SD-VAE folder, and write PNGs, an ADM-evaluator .npz\n"
        "(arr_0, uint8 NHWC) and the resolved config to out_dir. Sample i is seeded by (seed, i),\n"
        "so results do not depend on batch size or process count; run under torchrun for multi-GPU.",
        SampleConfig,
    )
    train_parser = _add_job(
        sub,
        "train",
        "train the MMDiT trunk with Self-Flow / flow matching / REPA through DeepSpeed",
        "Train the shared MMDiT trunk: each step draws one modality, noises it with dual timesteps\n"
        "and trains student + EMA teacher (objective.method selects Self-Flow, vanilla flow matching\n"
        "or REPA). Checkpoints go to run_dir/checkpoints; an existing run folder is resumed. Launch\n"
        "one process directly, or many with torchrun / the deepspeed launcher / srun.",
        TrainConfig,
    )
    train_parser.add_argument(
        "--resume", action="store_true", help="require a checkpoint in run_dir to continue from (error if none)"
    )
    train_parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
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
    args = parser.parse_args(argv)
    try:
        if args.job == "sample":
            cfg = load_config(SampleConfig, args.config, args.overrides)
            run_sample(cfg)
        elif args.job == "train":
            cfg = load_config(TrainConfig, args.config, args.overrides)
            if args.resume and not checkpoints.candidates(cfg.run_dir):
                raise FileNotFoundError(
                    f"--resume: no complete checkpoint in {checkpoints.checkpoint_root(cfg.run_dir)}"
                )
            train(cfg)
        elif args.job == "export":
            from selfflow.training.export import export

            print(f"wrote {export(args.run, args.out, args.checkpoint, args.student)}")
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as err:
        print(f"selfflow {args.job}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
