"""Step time and loss curves of Self-Flow vs vanilla flow matching on the same model and data.

Runs `selfflow train` twice (same config, `objective.method` = selfflow / fm) one after the
other and prints the median optimizer-step time of each (first 20 steps dropped as warm-up),
their ratio, and the first / last 10-step mean of each loss term.

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


if __name__ == "__main__":
    main()
