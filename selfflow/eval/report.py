"""`selfflow report`: one HTML page and one Markdown file from one or more runs and evaluations.

Each entry of `runs` is a training run folder (its `metrics.jsonl` gives loss curves, its
`evals/*/eval.json` the periodic and final evaluations), an evaluation folder holding an
`eval.json`, or a robot-policy evaluation folder holding a `results.json` (success rates per task).
The report has, per modality and per set of samples (the reported one, without guidance by
default, and the guided one where the evaluation made it, each table labelled by its CFG), a
table of the latest evaluation of every run (every metric, plus caption-following accuracy per
attribute), loss curves and metric-vs-step plots (matplotlib PNGs), and the samples: image grids,
videos (GIF) and audio players, with their captions. Media are copied next to the report so the
folder can be moved or attached as a whole. With `mlflow=true` the report folder is logged as
artifacts of each run's MLflow run (the one named in the run folder's `mlflow_run.json`, written
by training).

Runs of one method over several seeds (folders `fm/seed0`, `fm/seed1`, ... or `fm_seed0`, ...;
`summary.seed_of`) are summarised first: mean ± sample std over the seeds per metric, and one line
per metric naming the differences between methods that exceed twice the pooled seed-to-seed std
(`summary`); the per-run tables follow, samples are shown for each method's first seed.

    selfflow report runs=[runs/demo] out_dir=runs/demo/report
    selfflow report runs=[runs/cmp/fm/seed0,runs/cmp/fm/seed1,runs/cmp/selfflow/seed0,runs/cmp/selfflow/seed1] \
        out_dir=runs/cmp/report
"""

import base64
import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from selfflow.eval.evaluate import GUIDED, REAL, flat, set_label
from selfflow.eval.summary import Spread, seed_of, spread, verdict

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MODALITIES = ("image", "video", "audio")
HEADLINE = ("fd_builtin", "caption_accuracy", "caption_accuracy_real", "linear_probe", "fvd", "fid", "sfid")
PROBE_LEVEL = "linear_probe_t"  # prefix of the noised probes' keys (`probe.probe_key`)


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=lambda: ["runs/demo"])  # run folders or eval folders
    out_dir: str = "runs/demo/report"
    title: str = "selfflow report"
    mlflow: bool = True  # log the report as artifacts of each run's MLflow run (when it has one)

    def __post_init__(self):
        if not self.runs:
            raise ValueError("runs must name at least one run or evaluation folder")


@dataclass
class Section:
    title: str
    plots: list[str]  # paths relative to the report folder
    tables: list[tuple[list[str], list[list[str]]]]  # (header, rows)
    samples: list[dict]  # {"run", "files", "captions"}, audio also "picture" (the clips' spectrograms)
    notes: list[str] = field(default_factory=list)  # lines of text after the tables


@dataclass
class Run:
    name: str
    folder: Path
    losses: list[dict]  # metrics.jsonl rows
    evals: list[tuple[Path, dict]]  # (folder, eval.json) sorted by step
    robot: dict | None = None  # results.json of a robot-policy evaluation (`selfflow robotics eval-simpler`)
    group: str = ""  # the method: runs that differ only in their seed share it (`summary.seed_of`)
    seed: int | None = None


def load_run(path: str | Path) -> Run:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"report: {folder} is not a folder")
    losses = []
    if (folder / "metrics.jsonl").is_file():
        losses = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found = [folder / "eval.json"] if (folder / "eval.json").is_file() else sorted(folder.glob("evals/*/eval.json"))
    evals = [(p.parent, json.loads(p.read_text())) for p in found]
    # by step; at equal steps a final evaluation (not a periodic `step_*` one) comes last, as the latest
    evals.sort(key=lambda e: (e[1].get("step", -1), not e[0].name.startswith("step_")))
    robot = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else None
    if not losses and not evals and robot is None:
        raise FileNotFoundError(
            f"report: {folder} has none of metrics.jsonl, eval.json, evals/*/eval.json, results.json"
        )
    group, seed = seed_of(folder)
    name = f"{group}_seed{seed}" if folder.name == f"seed{seed}" else folder.name  # unique in media file names
    return Run(name, folder, losses, evals, robot, group, seed)


def distinct_names(runs: list[Run]) -> None:
    """Runs whose folders share a name (`a/demo`, `b/demo`) are named by as many parent folders as it
    takes to tell them apart (`a_demo`, `b_demo`): names label table rows and prefix copied media."""
    depth = 1
    while len({r.name for r in runs}) < len(runs) and depth < max(len(r.folder.resolve().parts) for r in runs):
        depth += 1
        names = [r.name for r in runs]
        for run in runs:
            if names.count(run.name) > 1:
                run.name = "_".join(run.folder.resolve().parts[-depth:]).lstrip("/_")
                if run.seed is None:
                    run.group = run.name
    if len({r.name for r in runs}) < len(runs):
        raise ValueError(f"report: the same folder is given twice: {sorted(str(r.folder) for r in runs)}")


def write_report(cfg: ReportConfig) -> Path:
    """Write report.html and report.md into `cfg.out_dir`; returns the HTML path."""
    runs = [load_run(r) for r in cfg.runs]
    distinct_names(runs)
    out = Path(cfg.out_dir)
    (out / "media").mkdir(parents=True, exist_ok=True)
    groups = group(runs)
    seeded = any(len(members) > 1 for members in groups.values())
    sections = [Section("methods and seeds", [], [], [], seeds_notes(groups))] if seeded else []
    if any(r.losses for r in runs):
        sections.append(Section("loss", [plot_losses(runs, out)], [], []))
    for modality in MODALITIES:
        latest = [(r, r.evals[-1]) for r in runs if r.evals and modality in r.evals[-1][1]["metrics"]]
        if latest:
            sections.append(modality_section(modality, latest, seeded, runs, out))
    robot = [r for r in runs if r.robot]
    if robot:
        sections.append(Section("robot tasks (success rate)", [], [robot_table(robot)], []))
    html_path = out / "report.html"
    html_path.write_text(render_html(cfg.title, runs, sections, out))
    (out / "report.md").write_text(render_markdown(cfg.title, runs, sections))
    if cfg.mlflow:
        for run in runs:
            log_to_mlflow(run.folder, out)
    return html_path


def group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by method, in order of first appearance, each method's runs by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return {name: sorted(members, key=lambda r: r.seed or 0) for name, members in groups.items()}


def seeds_notes(groups: dict[str, list[Run]]) -> list[str]:
    seeds = [f"{name} ({', '.join(str(r.seed) for r in members)})" for name, members in groups.items()]
    return [
        "Methods (seeds): " + ", ".join(seeds) + ".",
        "Summary tables give mean ± sample standard deviation over a method's seeds (n runs, each at its "
        "latest evaluation). Two methods differ beyond noise on a metric when their means are further apart "
        "than twice the pooled seed-to-seed std (with 3 seeds each: Student's t > 2.45 on 4 degrees of freedom, "
        "two-sided p < 0.07); every other difference is within noise.",
    ]


def modality_section(modality: str, latest, seeded: bool, runs: list[Run], out: Path) -> Section:
    """A modality's tables (per set of samples: summary over seeds, then per run), notes, plots, samples."""
    tables, notes, samples = [protocol_table(latest)], [], []
    shown = {id(members[0]) for members in group([r for r, _ in latest]).values()}  # each method's first seed
    for guided in (False, True):
        rows = [(r, result, set_metrics(result, modality, guided)) for r, (_, result) in latest]
        rows = [(r, result, metrics) for r, result, metrics in rows if metrics is not None]
        if not rows:
            continue
        label = " / ".join(dict.fromkeys(set_name(result, guided) for _, result, _ in rows))
        checked = [row for row in rows if "caption_accuracy" in row[2]]  # the built-in data's ground truth
        if seeded:
            header, body, spreads = summary_table(rows, label)
            tables += [(header, body)] + ([attribute_summary_table(checked, label)] if checked else [])
            notes += [f"{label}: " + verdict(key, by_group, fmt) for key, by_group in spreads.items()]
        tables += [metric_table(rows, label)] + ([attribute_table(checked, label)] if checked else [])
        if not guided:
            notes += probe_notes(rows)
        for r, (folder, result) in latest:
            if id(r) in shown and set_metrics(result, modality, guided) is not None:
                samples.append(copy_samples(modality, r, folder, result, out, label, GUIDED if guided else None))
    for r, (folder, result) in latest:  # the real items the samples were conditioned on, first
        if id(r) in shown and REAL in result.get("media", {}).get(modality, {}):
            samples.insert(0, copy_samples(modality, r, folder, result, out, "real items", REAL))
    plots = [p for p in [plot_metric_vs_step(modality, runs, out)] if p]
    return Section(modality, plots, tables, samples, notes)


# ---------------------------------------------------------------- tables


def set_metrics(result: dict, modality: str, guided: bool) -> dict | None:
    """One set of a modality's metrics: the reported set (everything but the guided set) or the guided set."""
    metrics = result["metrics"][modality]
    if guided:
        return metrics.get(GUIDED)
    return {k: v for k, v in metrics.items() if k != GUIDED}


def set_name(result: dict, guided: bool) -> str:
    """The set's label from the evaluation's protocol (`evaluate.set_label`)."""
    protocol = result.get("protocol", {})
    return set_label(protocol["guided_cfg"] if guided else protocol.get("sampler", {}).get("cfg_scale", 1.0))


def headline(metrics: dict) -> dict[str, float]:
    """A modality's numbers (`evaluate.flat`), the usual ones first (probes by noise level), without timings."""
    values = flat(metrics)
    probes = sorted((k for k in values if k.startswith(PROBE_LEVEL)), key=lambda k: float(k[len(PROBE_LEVEL) :]))
    order = [*HEADLINE[:4], *probes, *HEADLINE[4:], *sorted(values)]
    return {k: values[k] for k in dict.fromkeys(order) if k in values and k != "seconds"}


def protocol_table(latest) -> tuple[list[str], list[list[str]]]:
    """How each run's latest evaluation was made: sampler, steps, guidance, N, seed, checkpoint step,
    and the sha256 of every network the metrics used."""
    header = ["run (evaluation protocol)", "checkpoint step", "weights sha256", "sampler", "steps"]
    header += ["reported set", "guided set", "N", "seed", "networks (sha256)"]
    body = []
    for r, (_, result) in latest:
        protocol, checkpoint = result.get("protocol", {}), result.get("checkpoint", {})
        sampler = protocol.get("sampler", {})
        guided = protocol.get("guided_cfg") or 0
        networks = ", ".join(f"{k} {v[:12]}" for k, v in sorted(result.get("weights_sha256", {}).items()))
        body.append(
            [
                r.name,
                str(checkpoint.get("step", result.get("step", "?"))),
                str(checkpoint.get("sha256", "-"))[:12],
                str(sampler.get("kind", "?")),
                str(sampler.get("num_steps", "?")),
                set_label(sampler.get("cfg_scale", 1.0)),
                set_label(guided) if guided else "-",
                str(protocol.get("num_samples", "?")),
                str(protocol.get("seed", "?")),
                networks or "-",
            ]
        )
    return header, body


def metric_table(rows, label: str) -> tuple[list[str], list[list[str]]]:
    values = [(r.name, result["step"], headline(metrics)) for r, result, metrics in rows]
    keys = list(dict.fromkeys(k for *_, v in values for k in v))
    body = [[name, str(step)] + [fmt(v.get(k)) for k in keys] for name, step, v in values]
    return [f"run ({label})", "step", *keys], body


def attribute_table(rows, label: str) -> tuple[list[str], list[list[str]]]:
    values = [(r.name, metrics["caption_accuracy"]["per_attribute"]) for r, _, metrics in rows]
    keys = list(dict.fromkeys(k for _, v in values for k in v))
    header = [f"run ({label}: caption accuracy per attribute)", *keys]
    return header, [[n] + [fmt(v.get(k)) for k in keys] for n, v in values]


def summary_table(rows, label: str):
    """Mean ± std over each method's seeds of every headline metric; also returns
    {metric: {method: Spread}} of the metrics worth comparing (not the real items' own scores)."""
    per_group: dict[str, list] = {}
    for r, result, metrics in rows:
        per_group.setdefault(r.group, []).append((result["step"], headline(metrics)))
    keys = list(dict.fromkeys(k for members in per_group.values() for _, v in members for k in v))
    spreads = {k: {} for k in keys}
    body = []
    for name, members in per_group.items():
        steps = "/".join(str(s) for s in sorted({step for step, _ in members}))
        row = [name, str(len(members)), steps]
        for key in keys:
            found = [v[key] for _, v in members if key in v]
            row.append(fmt_spread(spread(found), len(members)) if found else "-")
            if found:
                spreads[key][name] = spread(found)
        body.append(row)
    header = [f"method ({label}: mean ± std over seeds)", "n", "step", *keys]
    return header, body, {k: v for k, v in spreads.items() if not k.endswith("_real")}


def attribute_summary_table(rows, label: str) -> tuple[list[str], list[list[str]]]:
    per_group: dict[str, list[dict]] = {}
    for r, _, metrics in rows:
        per_group.setdefault(r.group, []).append(metrics["caption_accuracy"]["per_attribute"])
    keys = list(dict.fromkeys(k for members in per_group.values() for v in members for k in v))
    body = []
    for name, members in per_group.items():
        cells = [[v[k] for v in members if k in v] for k in keys]
        body.append([name, str(len(members))] + [fmt_spread(spread(c), len(members)) if c else "-" for c in cells])
    return [f"method ({label}: caption accuracy per attribute, mean ± std)", "n", *keys], body


def probe_notes(rows) -> list[str]:
    """What a linear probe's accuracy is measured against: the majority baseline (data only)."""
    probes = [(k, v) for _, _, metrics in rows for k, v in metrics.items() if k.startswith("linear_probe")]
    if not probes:
        return []
    first = probes[0][1]
    levels = ", ".join(f"{k} (t = {v['t']:g})" for k, v in dict(probes).items())
    return [
        f"Linear probes: {levels}, block {first['layer']}, {first['train_items']} items fitted, "
        f"{first['test_items']} held out; always guessing each attribute's majority answer scores "
        f"{first['majority']:.3f} (it depends only on the data)."
    ]


def fmt_spread(s: Spread, n: int) -> str:
    """`mean ± std` to the decimals `fmt` gives the mean, with the count when some runs lack the metric."""
    digits = 3 if abs(s.mean) < 100 else 1
    text = fmt(s.mean) if s.std is None else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"
    return text if s.n == n else f"{text} (n={s.n})"


def robot_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for run in runs:
        for task, row in run.robot["tasks"].items():
            rate = f"{100 * row['success_rate']:.1f}%"
            rows.append([run.name, task, str(row["episodes"]), str(row["successes"]), rate])
        rows.append([run.name, "mean", "", "", f"{100 * run.robot['mean_success_rate']:.1f}%"])
    return ["run", "task", "episodes", "successes", "success rate"], rows


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


# ---------------------------------------------------------------- plots


LOSS_PANELS = (  # (metrics.jsonl key, title, y scale)
    ("fm", "flow-matching loss", "log"),  # positive, falls over orders of magnitude
    ("rep", "representation term", "linear"),  # -cosine under Self-Flow / REPA: negative
    ("loss", "total loss", "linear"),  # fm + gamma * rep: goes negative under Self-Flow
)


def plot_losses(runs: list[Run], out: Path) -> str:
    """Each loss term on a scale that fits it (flow matching on a log axis; the representation term and
    the total, negative under Self-Flow, on linear ones), smoothed, and the learning-rate schedule."""
    panels = [(k, t, scale) for k, t, scale in LOSS_PANELS if any(k in row for r in runs for row in r.losses)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.4), squeeze=False)
    colours = {name: f"C{i % 10}" for i, name in enumerate(group(runs))}  # one colour per method, all its seeds
    labelled = set()
    for run in runs:
        label = None if run.group in labelled else (run.group if run.seed is not None else run.name)
        labelled.add(run.group)
        for ax, (key, _, _) in zip(axes[0], panels, strict=False):
            rows = [row for row in run.losses if key in row and row[key] == row[key]]  # drop NaN (skipped steps)
            if rows:
                values = smooth([row[key] for row in rows])
                ax.plot([row["step"] for row in rows], values, label=label, color=colours[run.group], alpha=0.8)
        rates = [(row["step"], row["lr"]) for row in run.losses if "lr" in row]
        if rates:
            axes[0][-1].plot(*zip(*rates, strict=True), label=label, color=colours[run.group])
    for ax, (key, title, scale) in zip(axes[0], panels, strict=False):
        lines = [y for line in ax.get_lines() for y in line.get_ydata()]
        fits = scale == "linear" or (lines and min(lines) > 0)  # a log axis only holds positive values
        ax.set(xlabel="step", ylabel=f"{key} (smoothed)", title=title, yscale=scale if fits else "linear")
    axes[0][0].legend()
    axes[0][-1].set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    return save_figure(fig, out / "media" / "loss.png")


def plot_metric_vs_step(modality: str, runs: list[Run], out: Path) -> str | None:
    keys = ("fd_builtin", "caption_accuracy", "fvd")
    series = {k: [] for k in keys}
    for run in runs:
        for key in keys:
            rows = [(r["step"], headline(r["metrics"][modality])) for _, r in run.evals if modality in r["metrics"]]
            points = [(step, values[key]) for step, values in rows if key in values]
            if points:
                series[key].append((run.name, points))
    keys = [k for k in keys if series[k]]
    if not keys or max(len(p) for k in keys for _, p in series[k]) < 2:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, points in series[key]:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(xlabel="step", title=f"{modality}: {key}")
    axes[0][0].legend()
    return save_figure(fig, out / "media" / f"{modality}_metrics.png")


def smooth(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def save_figure(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"media/{path.name}"


# ---------------------------------------------------------------- samples, rendering, MLflow


def copy_samples(modality: str, run: Run, folder: Path, result: dict, out: Path, label: str, key: str | None) -> dict:
    """Copy one set of an evaluation's media (`key`: None the samples, GUIDED, REAL) beside the report."""
    saved = result.get("media", {}).get(modality, {"files": [], "captions": []})
    saved = saved.get(key, {"files": [], "captions": []}) if key else saved

    def copy(rel: str) -> str:
        target = out / "media" / f"{run.name}_step{result['step']}_{Path(rel).name}"
        shutil.copyfile(folder / rel, target)
        return f"media/{target.name}"

    files = [copy(rel) for rel in saved["files"]]
    block = {"run": f"{run.name}, {label}", "files": files, "captions": saved["captions"]}
    if saved.get("picture"):  # audio: the clips' spectrograms in one picture
        block["picture"] = copy(saved["picture"])
    return block


SPECTROGRAMS = (
    "log spectrograms of the clips below, in their order by rows (0 Hz at the bottom; -100 dB black, 0 dB white)"
)
MIME = {".png": "image/png", ".gif": "image/gif", ".wav": "audio/wav", ".mp4": "video/mp4"}
EMBED_LIMIT = 8 * 2**20  # bytes; larger files stay links beside the report


def source(path: str, out: Path) -> str:
    """The `src` of a media file beside the report in `out`: its bytes as a data URI, so the page is whole
    wherever it is shown (MLflow's artifact viewer renders HTML without its neighbouring files), or its
    relative path when it is over EMBED_LIMIT."""
    file = out / path
    if file.stat().st_size > EMBED_LIMIT:
        return path
    mime = MIME.get(file.suffix, "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(file.read_bytes()).decode()}"


def media_html(path: str, out: Path) -> str:
    if path.endswith(".wav"):
        return f'<audio controls src="{source(path, out)}"></audio>'
    return f'<img src="{source(path, out)}" alt="{html.escape(path)}" style="image-rendering: pixelated">'


def table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(title: str, runs: list[Run], sections: list[Section], out: Path) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}figure{display:inline-block;"
        "margin:4px;max-width:220px;font-size:11px;vertical-align:top}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>runs: {', '.join(html.escape(str(r.folder)) for r in runs)}</p>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [table_html(*t) for t in section.tables]
        if section.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in section.notes) + "</ul>")
        parts += [f'<img src="{source(p, out)}" alt="{html.escape(p)}">' for p in section.plots]
        for block in section.samples:
            parts.append(f"<h3>samples: {html.escape(block['run'])}</h3>")
            if block.get("picture"):
                parts.append(f"<p>{SPECTROGRAMS}</p>" + media_html(block["picture"], out))
            if len(block["files"]) == 1 and len(block["captions"]) > 1:  # one grid for many captions
                parts.append(media_html(block["files"][0], out))
                parts.append("<ol start='0'>" + "".join(f"<li>{html.escape(c)}</li>" for c in block["captions"]))
                parts.append("</ol>")
            else:
                for path, caption in zip(block["files"], block["captions"], strict=False):
                    parts.append(
                        f"<figure>{media_html(path, out)}<figcaption>{html.escape(caption)}</figcaption></figure>"
                    )
    return "\n".join(parts + ["</body></html>"])


def table_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(title: str, runs: list[Run], sections: list[Section]) -> str:
    parts = [f"# {title}", "", "runs: " + ", ".join(f"`{r.folder}`" for r in runs), ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        parts += [table_markdown(*t) + "\n" for t in section.tables]
        parts += [f"- {n}" for n in section.notes] + ([""] if section.notes else [])
        parts += [f"![{section.title}]({p})\n" for p in section.plots]
        for block in section.samples:
            parts.append(f"samples of `{block['run']}`: " + ", ".join(f"[{Path(f).name}]({f})" for f in block["files"]))
            parts.append("")
            if block.get("picture"):
                parts += [f"{SPECTROGRAMS}:", "", f"![spectrograms of `{block['run']}`]({block['picture']})", ""]
    return "\n".join(parts) + "\n"


def log_to_mlflow(run_folder: Path, report_dir: Path) -> None:
    """Attach the report to the MLflow run of a training run folder (no-op for folders without one)."""
    record = run_folder / "mlflow_run.json"
    if not record.is_file():
        return
    from mlflow.tracking import MlflowClient

    info = json.loads(record.read_text())
    MlflowClient(tracking_uri=info["tracking_uri"]).log_artifacts(info["run_id"], str(report_dir), "report")
