"""Step time and loss curves of Self-Flow vs vanilla flow matching on the same model and data.

Runs `selfflow train` twice (same config, `objective.method` = selfflow / fm) one after the
other and prints the median optimizer-step time of each (first 20 steps dropped as warm-up),
their ratio, the first / last 10-step mean of each loss term, and the median time each step waited
for its batch (`data_time` of metrics.jsonl). With `--peak-tflops` it also
prints tokens/s and the model FLOPs utilisation of the student's forward + backward:

    FLOPs per step = 3 * tokens * (2 * P_matmul + 4 * depth * L * D)

with `P_matmul` the trunk's matrix parameters touched per data token (blocks, this modality's
projections, head; embedders and shared modulation run once per (sample, t), and the double
blocks' text stream and the other modalities' projections do not run on synthetic latents
without captions, so they are left out), `L` the
joint sequence length and `D` the width (attention: `QK^T` and `AV`, 2 FLOPs per MAC), and
`3x` for forward + backward. The full step (teacher, EMA, optimizer) is in the denominator.

    python benchmarks/selfflow_vs_fm.py --config configs/train/tiny.yaml --steps 300 [key=value ...]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(method: str, config: str, steps: int, overrides: list[str], root: Path) -> list[dict]:
    run_dir = root / method
    cmd = [sys.executable, "-m", "selfflow.cli", "train", "--config", config, f"run_dir={run_dir}"]
    cmd += [f"objective.method={method}", f"steps={steps}", f"save_every={steps}", "tracking.enabled=false", *overrides]
    subprocess.run(cmd, check=True, capture_output=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/tiny.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak (H100 SXM bf16 dense: 989)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run(m, args.config, args.steps, args.overrides, Path(tmp)) for m in ("selfflow", "fm")}
    times = {m: statistics.median(r["step_time"] for r in rows[20:]) for m, rows in results.items()}
    for method, rows in results.items():
        first, last = rows[:10], rows[-10:]
        print(
            f"{method:8s} median step {times[method] * 1e3:7.2f} ms | "
            f"loss {mean(first, 'loss'):.4f} -> {mean(last, 'loss'):.4f} | "
            f"fm {mean(first, 'fm'):.4f} -> {mean(last, 'fm'):.4f} | "
            f"rep {mean(first, 'rep'):.4f} -> {mean(last, 'rep'):.4f}"
        )
    print(f"step time ratio selfflow / fm: {times['selfflow'] / times['fm']:.3f}")
    for method, rows in results.items():  # the host's wait for the batch inside the step (target: <= 1 ms)
        wait = statistics.median(r["data_time"] for r in rows[20:])
        print(f"{method:8s} median data time {wait * 1e3:.3f} ms of the step")
    if args.peak_tflops:
        flops, tokens = student_flops(args.config, args.overrides)
        for method, seconds in times.items():
            mfu = flops / seconds / (args.peak_tflops * 1e12)
            print(f"{method:8s} {tokens / seconds:,.0f} tokens/s, student fwd+bwd MFU {100 * mfu:.1f}%")


def student_flops(config: str, overrides: list[str]) -> tuple[float, int]:
    """Student forward + backward FLOPs and data tokens of one step, for a single-modality run."""
    from selfflow.backbone.mmdit import MMDiT
    from selfflow.config import load_config
    from selfflow.pretrain import PretrainConfig  # what `selfflow train` reads

    cfg = load_config(PretrainConfig, config, overrides)
    (name, mix), *rest = cfg.modalities.items()
    if rest:
        raise SystemExit("--peak-tflops needs a single-modality run (drop the others with modalities.NAME=null)")
    import torch

    with torch.device("meta"):
        model = MMDiT(cfg.model)
    from selfflow.backbone.mmdit_blocks import input_name, output_name

    skip = ("time_in", "guidance_in", "y_in", "txt_", "double_stream_modulation", "single_stream_modulation")
    others = [m for m in cfg.model.modalities if m != name]
    skip += tuple(input_name(m) for m in others) + tuple(f"final_layer.{output_name(m)}" for m in others)

    def runs_per_token(param_name: str) -> bool:
        return not param_name.startswith(skip) and ".txt_" not in param_name

    per_token = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and runs_per_token(n))
    length = 1
    for g in mix.data.grid:
        length *= g
    tokens = mix.batch_size * length
    attention = 4 * cfg.model.depth * length * cfg.model.hidden_size
    return 3 * tokens * (2 * per_token + attention), tokens


if __name__ == "__main__":
    main()
