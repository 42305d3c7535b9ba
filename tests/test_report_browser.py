"""The report in a real browser: every picture, plot, GIF and audio player of report.html loads in
headless Chromium, also when the page is shown alone (as MLflow's artifact viewer shows it, without
the media folder beside it).

Chromium is Debian's `chromium` package (`make test` installs it when missing)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from selfflow.eval.media import save_gif, save_grid, save_spectrograms, save_wav
from selfflow.eval.report import ReportConfig, write_report

PROBE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const images = [...document.images].map(
    i => ({src: i.alt || i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0}));
  const audio = [...document.querySelectorAll("audio, video")].map(
    a => ({src: a.src.slice(0, 40), ok: a.readyState >= 1}));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images, audio});
  document.body.appendChild(out);
}, 1500));
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium; `make test` tries to)")


def loaded(page: Path) -> dict:
    """Open `page` with the probe appended; returns what loaded."""
    probed = page.with_name("probed_" + page.name)
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"]
    command += ["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run: {dom[-500:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def fake_eval(folder: Path) -> None:
    """An evaluation folder as `selfflow eval` writes one (eval.json, a grid, a GIF, WAVs)."""
    rng = np.random.default_rng(0)
    samples = folder / "samples"
    save_grid(rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), samples / "image_grid.png")
    save_grid(rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8), samples / "real_image_grid.png")
    save_gif(rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8), samples / "video_0.gif")
    tone = np.sin(np.arange(8000) / 5.0) * 0.5
    save_wav(tone, 16000, samples / "audio_0.wav")
    save_spectrograms(tone[None], 16000, samples / "audio_spectrograms.png")
    media = {
        "image": {"files": ["samples/image_grid.png"], "captions": ["a", "b", "c", "d"],
                  "real": {"files": ["samples/real_image_grid.png"], "captions": ["a", "b", "c", "d"]}},
        "video": {"files": ["samples/video_0.gif"], "captions": ["v"]},
        "audio": {"files": ["samples/audio_0.wav"], "captions": ["a tone"],
                  "picture": "samples/audio_spectrograms.png"},
    }  # fmt: skip
    metrics = {name: {"fd_builtin": 1.0} for name in media}
    protocol = {"sampler": {"kind": "euler", "num_steps": 25, "cfg_scale": 1.0}, "guided_cfg": 0, "num_samples": 4}
    result = {"step": 10, "metrics": metrics, "media": media, "protocol": protocol, "weights_sha256": {}}
    (folder / "eval.json").write_text(json.dumps({**result, "checkpoint": {"step": 10, "sha256": "ab" * 32}}))


def test_every_media_element_of_the_report_loads_in_chromium_also_alone(tmp_path):
    chromium()  # fails here, naming the package, when the browser is missing
    for name in ("a", "b"):
        fake_eval(tmp_path / name / "demo")  # two inputs with one folder name: told apart in the report
        rows = [{"step": s, "loss": 1.0 / s - 0.2, "fm": 1.0 / s, "rep": -0.2, "lr": 1e-3} for s in range(1, 30)]
        (tmp_path / name / "demo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    page = write_report(
        ReportConfig(runs=[str(tmp_path / "a" / "demo"), str(tmp_path / "b" / "demo")], out_dir=str(out), mlflow=False)
    )
    text = page.read_text()
    assert "a_demo" in text and "b_demo" in text and "weights sha256" in text and "abababababab" in text

    alone = tmp_path / "viewer" / "report.html"  # no media folder beside it
    alone.parent.mkdir()
    shutil.copyfile(page, alone)
    for shown in (page, alone):
        result = loaded(shown)
        assert len(result["images"]) >= 5 and len(result["audio"]) == 2  # plots, grids, GIFs; one WAV per input
        assert sum("audio_spectrograms" in item["src"] for item in result["images"]) == 2  # one per input
        assert all(item["ok"] for item in result["images"] + result["audio"]), result


def test_the_probe_sees_a_broken_picture(tmp_path):
    """The check above can fail: a page whose picture is missing reports it."""
    page = tmp_path / "page.html"
    page.write_text('<html><body><img alt="media" src="media/nothing.png"></body></html>')
    result = loaded(page)
    assert result["images"] == [{"src": "media", "ok": False}]
