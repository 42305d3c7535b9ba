"""`selfflow report` over several seeds per method: run folders grouped by method, mean ± sample std
per metric checked against numpy / statistics, the beyond-noise verdicts against an independent
pooled-std computation (and the t-test the rule amounts to, from scipy), and the labelled
unguided / guided tables. The run folders are fakes holding eval.json files with known numbers."""

import json
import math
import re
import statistics

import numpy as np
import pytest
from scipy import stats

from selfflow.cli import main
from selfflow.eval.summary import NOISE_FACTOR, seed_of, spread

# method -> per-seed image fd_builtin: fm and selfflow differ beyond noise, fm and repa do not
FD = {"fm": [100.0, 112.5, 121.0], "repa": [104.0, 126.0, 115.5], "selfflow": [61.0, 66.5, 70.25]}
GUIDED_FD = {"fm": [90.0, 91.0, 92.0], "repa": [80.0, 82.0, 84.0], "selfflow": [89.0, 95.0, 90.0]}


def fake_eval(rng: np.random.Generator, fd: float, guided_fd: float) -> dict:
    """An eval.json of one image evaluation: reported set (no guidance), guided set (CFG 2), two probes."""
    per_attribute = {"background": float(rng.uniform(0.5, 1)), "colour": float(rng.uniform(0, 0.2))}
    probe = {"layer": 2, "train_items": 18, "test_items": 6, "majority": 0.75}
    return {
        "step": 100,
        "protocol": {"sampler": {"kind": "euler", "cfg_scale": 1.0}, "guided_cfg": 2.0},
        "metrics": {
            "image": {
                "fd_builtin": fd,
                "caption_accuracy": {"overall": float(rng.uniform(0, 0.3)), "per_attribute": per_attribute},
                "caption_accuracy_real": {"overall": 1.0, "per_attribute": {"background": 1.0, "colour": 1.0}},
                "linear_probe": {**probe, "t": 0.0, "accuracy": float(rng.uniform(0.7, 0.9))},
                "linear_probe_t0.5": {**probe, "t": 0.5, "accuracy": float(rng.uniform(0.7, 0.9))},
                "seconds": 1.0,
                "guided": {
                    "fd_builtin": guided_fd,
                    "caption_accuracy": {"overall": float(rng.uniform(0.2, 0.5)), "per_attribute": per_attribute},
                },
            }
        },
        "media": {"image": {"files": [], "captions": [], "guided": {"files": [], "captions": []}}},
    }


@pytest.fixture
def seeded_runs(tmp_path):
    """fm and repa as `<method>/seed<N>` folders, selfflow as `selfflow_seed<N>` folders."""
    rng = np.random.default_rng(0)
    folders, evals = [], {}
    for method in FD:
        for seed in range(3):
            folder = tmp_path / (f"{method}_seed{seed}" if method == "selfflow" else f"{method}/seed{seed}")
            result = fake_eval(rng, FD[method][seed], GUIDED_FD[method][seed])
            (folder / "evals" / "final").mkdir(parents=True)
            (folder / "evals" / "final" / "eval.json").write_text(json.dumps(result))
            rows = [{"step": k, "loss": 1.0 / k + seed, "lr": 1e-3} for k in range(1, 6)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            folders.append(folder)
            evals.setdefault(method, []).append(result["metrics"]["image"])
    return folders, evals


def table_rows(markdown: str, first_header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose first header cell is `first_header`, by first cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def expected(values: list[float]) -> str:
    """`mean ± std` computed independently (numpy, sample std), with the report's decimals."""
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    digits = 3 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def test_spread_is_the_sample_mean_and_std():
    values = [0.1875, 0.25, 0.3125, 0.40625]
    s = spread(values)
    assert s.n == 4
    assert s.mean == pytest.approx(statistics.fmean(values), rel=1e-15)
    assert s.std == pytest.approx(statistics.stdev(values), rel=1e-14)
    assert s.std == pytest.approx(float(np.std(values, ddof=1)), rel=1e-14)
    assert spread([3.0]).std is None


def test_run_folders_name_their_method_and_seed(tmp_path):
    assert seed_of(tmp_path / "fm" / "seed2") == ("fm", 2)
    assert seed_of(tmp_path / "no_masking_seed11") == ("no_masking", 11)
    assert seed_of(tmp_path / "l2-seed0") == ("l2", 0)
    assert seed_of(tmp_path / "demo") == ("demo", None)


def test_report_gives_mean_and_std_over_seeds(seeded_runs, tmp_path):
    folders, evals = seeded_runs
    out = tmp_path / "report"
    assert main(["report", f"runs=[{','.join(map(str, folders))}]", f"out_dir={out}", "mlflow=false"]) == 0
    markdown = (out / "report.md").read_text()
    assert "Methods (seeds): fm (0, 1, 2), repa (0, 1, 2), selfflow (0, 1, 2)." in markdown
    assert (out / "media" / "loss.png").is_file()  # one colour per method

    unguided = table_rows(markdown, "method (no guidance: mean ± std over seeds)")
    assert list(unguided) == ["fm", "repa", "selfflow"]
    for method, metrics in evals.items():
        row = unguided[method]
        assert row["n"] == "3" and row["step"] == "100"
        assert row["fd_builtin"] == expected(FD[method])
        assert row["caption_accuracy"] == expected([m["caption_accuracy"]["overall"] for m in metrics])
        assert row["linear_probe"] == expected([m["linear_probe"]["accuracy"] for m in metrics])
        assert row["linear_probe_t0.5"] == expected([m["linear_probe_t0.5"]["accuracy"] for m in metrics])
        assert row["caption_accuracy_real"] == "1.000 ± 0.000"
        assert "seconds" not in row
    attributes = table_rows(markdown, "method (no guidance: caption accuracy per attribute, mean ± std)")
    colour = [m["caption_accuracy"]["per_attribute"]["colour"] for m in evals["repa"]]
    assert attributes["repa"]["colour"] == expected(colour)

    guided = table_rows(markdown, "method (CFG 2: mean ± std over seeds)")
    for method, metrics in evals.items():
        assert guided[method]["fd_builtin"] == expected(GUIDED_FD[method])
        assert guided[method]["caption_accuracy"] == expected(
            [m["guided"]["caption_accuracy"]["overall"] for m in metrics]
        )
        assert "linear_probe" not in guided[method] and "caption_accuracy_real" not in guided[method]
    # the per-run tables follow, labelled by set, one row per run
    assert set(table_rows(markdown, "run (no guidance)")) == {f"{m}_seed{s}" for m in FD for s in range(3)}
    assert table_rows(markdown, "run (no guidance)")["repa_seed1"]["fd_builtin"] == "126.0"
    assert table_rows(markdown, "run (CFG 2)")["repa_seed1"]["fd_builtin"] == "82.000"
    assert "always guessing each attribute's majority answer scores 0.750" in markdown


def beyond_noise_pairs(values: dict[str, list[float]]) -> set[tuple[str, str]]:
    """Pairs (lower mean, higher mean) whose gap exceeds NOISE_FACTOR pooled sample stds, by numpy."""
    pairs = set()
    names = list(values)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = np.array(values[a]), np.array(values[b])
            pooled = np.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / (len(x) + len(y) - 2))
            if abs(x.mean() - y.mean()) > NOISE_FACTOR * pooled:
                pairs.add(tuple(sorted((a, b), key=lambda m: np.mean(values[m]))))
    return pairs


def test_report_says_which_differences_exceed_the_spread(seeded_runs, tmp_path):
    folders, _ = seeded_runs
    out = tmp_path / "report"
    assert main(["report", f"runs=[{','.join(map(str, folders))}]", f"out_dir={out}", "mlflow=false"]) == 0
    markdown = (out / "report.md").read_text()
    for label, values in (("no guidance", FD), ("CFG 2", GUIDED_FD)):
        line = next(x for x in markdown.splitlines() if x.startswith(f"- {label}: fd_builtin: "))
        found = set(re.findall(r"(\w+) [\d.]+ < (\w+) [\d.]+ \(gap", line))
        assert found == beyond_noise_pairs(values), line
        assert f"Within noise: {3 - len(found)} of 3 pairs." in line or (not found and "all of 3" in line)
    assert beyond_noise_pairs(FD) == {("selfflow", "fm"), ("selfflow", "repa")}
    assert beyond_noise_pairs(GUIDED_FD) == {("repa", "fm"), ("repa", "selfflow")}
    # with 3 seeds each the rule is Student's t > 2 / sqrt(2/3) on 4 degrees of freedom: p = 0.07
    t = stats.ttest_ind(FD["fm"], FD["selfflow"]).statistic
    pooled = math.sqrt((statistics.variance(FD["fm"]) + statistics.variance(FD["selfflow"])) / 2)
    gap = statistics.fmean(FD["fm"]) - statistics.fmean(FD["selfflow"])
    assert t == pytest.approx(gap / (pooled * math.sqrt(2 / 3)))
    assert 2 * stats.t.sf(NOISE_FACTOR / math.sqrt(2 / 3), df=4) == pytest.approx(0.0705, abs=5e-4)
    assert "- no guidance: caption_accuracy_real" not in markdown  # the real items' own score is not compared


def test_single_runs_get_no_summary_and_a_folder_given_twice_is_refused(seeded_runs, tmp_path, capsys):
    folders, _ = seeded_runs
    out = tmp_path / "report"
    assert main(["report", f"runs=[{folders[0]},{folders[3]}]", f"out_dir={out}", "mlflow=false"]) == 0
    markdown = (out / "report.md").read_text()
    assert "mean ± std" not in markdown and "Methods (seeds)" not in markdown
    assert set(table_rows(markdown, "run (no guidance)")) == {"fm_seed0", "repa_seed0"}
    assert main(["report", f"runs=[{folders[0]},{folders[0]}]", f"out_dir={out}", "mlflow=false"]) != 0
    assert "the same folder is given twice" in capsys.readouterr().err  # folders sharing a name are told apart
