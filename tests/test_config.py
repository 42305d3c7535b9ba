"""Config loading: presets, overrides, and errors that name the key and the file."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from selfflow.backbone.sit import SiTConfig
from selfflow.config import ConfigError, load_config, save_config
from selfflow.eval.sample import SampleConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    steps: int = 3
    rate: float = 0.5
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    path: str | None = None
    flag: bool = False


def write(tmp_path, data) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_yaml_and_overrides_compose(tmp_path):
    path = write(tmp_path, {"inner": {"steps": 7}, "flag": True})
    cfg = load_config(Outer, path, ["inner.rate=2", "path=/x", "inner.names=[a, b]", "inner.rate=1e-4"])
    assert cfg == Outer(Inner(7, 1e-4, ["a", "b"]), "/x", True)
    assert isinstance(cfg.inner.rate, float)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, {"inner": {"stepz": 7}})
    with pytest.raises(ConfigError, match=r"run\.yaml.*unknown key inner\.stepz \(did you mean inner\.steps\?"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="unknown key bogus"):
        load_config(Outer, path=None, overrides=["bogus=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inner.steps=1.5", "inner.steps must be int"),
        ("flag=yes please", "flag must be bool"),
        ("inner.steps=true", "inner.steps must be int"),
        ("inner.names=3", r"inner.names must be list"),
    ],
)
def test_wrong_type_names_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, write(tmp_path, {}), [override])


def test_impossible_value_names_key_and_file(tmp_path):
    path = write(tmp_path, {"model": {"depth": 0}, "vae": "/v"})
    with pytest.raises(ConfigError, match=r"run\.yaml.*model.*depth must be positive"):
        load_config(SampleConfig, path)
    with pytest.raises(ConfigError, match="num_heads=5 does not divide hidden_size=1152"):
        load_config(SampleConfig, path, ["model.depth=2", "model.num_heads=5"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Outer, None, ["no_equals_sign"])
    with pytest.raises(ConfigError, match=r"override 'inner.names=\[a, b': value is not valid YAML"):
        load_config(Outer, None, ["inner.names=[a, b"])


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("inner:\n  steps: 3\n names: [a\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML.*line 3"):
        load_config(Outer, path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SampleConfig, "configs/sample/tiny.yaml", ["sampler.num_steps=9"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(SampleConfig, tmp_path / "resolved.yaml")
    assert again == cfg and again.sampler.num_steps == 9


@pytest.mark.parametrize("preset", ["configs/sample/tiny.yaml", "configs/sample/imagenet256.yaml"])
def test_presets_load(preset):
    cfg = load_config(SampleConfig, preset, ["vae=/some/vae"])
    assert isinstance(cfg.model, SiTConfig)


def preset_class(path: Path) -> type:
    """The job config class each preset folder feeds."""
    from selfflow.data.prepare import PrepareConfig
    from selfflow.data.synth import SynthConfig
    from selfflow.eval.evaluate import EvalJobConfig
    from selfflow.pretrain import PretrainConfig

    folder = path.parent.name
    if folder == "robotics":
        from selfflow.robotics.agent import EvalSimplerConfig
        from selfflow.robotics.convert import ConvertConfig
        from selfflow.robotics.finetune import FinetuneConfig

        return {"rt1": ConvertConfig, "finetune": FinetuneConfig, "simpler": EvalSimplerConfig}[path.stem.split("_")[0]]
    if folder == "data":
        return PrepareConfig if path.name.startswith("prepare") else SynthConfig
    return {"train": PretrainConfig, "eval": EvalJobConfig}[folder]


JOB_PRESETS = [p for p in sorted(REPO.glob("configs/*/*.yaml")) if p.parent.name != "sample"]  # sample: above


@pytest.mark.parametrize("path", JOB_PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_preset_loads(path):
    assert load_config(preset_class(path), path) is not None


def test_demo_presets_agree():
    """The demo's trunk reads its token widths and caption length from the data it trains on (the
    manifest that prepare writes; tests/test_train_units.py checks the reading), so its preset states
    none; training, prepare and evaluation name the same folders."""
    from selfflow.data.prepare import PrepareConfig
    from selfflow.eval.evaluate import EvalJobConfig
    from selfflow.pretrain import PretrainConfig

    prep = load_config(PrepareConfig, REPO / "configs/data/prepare_demo.yaml")
    train = load_config(PretrainConfig, REPO / "configs/train/demo.yaml")
    job = load_config(EvalJobConfig, REPO / "configs/eval/demo.yaml")
    written = yaml.safe_load((REPO / "configs/train/demo.yaml").read_text())["model"]
    assert not {"modalities", "text_vocab", "text_max_length"} & set(written)
    for name in prep.modalities:
        assert train.modalities[name].shards == f"{prep.out_dir}/{name}"
    assert job.eval.data == prep.out_dir and job.checkpoint.startswith(train.run_dir)


VERBS = ["synth", "pack", "prepare", "train", "sample", "generate", "eval", "report"]
VERBS += ["robotics convert", "robotics finetune", "robotics eval-simpler"]
NEEDED = {"pack": ["src=/tmp"], "generate": ["model=/tmp"]}  # keys with no default
PRESETS = {"sample": REPO / "configs/sample/tiny.yaml"}  # the defaults alone need a VAE folder


@pytest.mark.parametrize("verb", VERBS)
def test_help_explains_keys_and_its_example_override_loads(verb, capsys):
    from selfflow.cli import _job_config, main

    with pytest.raises(SystemExit) as exit_info:
        main([*verb.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    example = text.rsplit("example: ", 1)[1].split()[-1]
    cls = _job_config(verb)
    assert load_config(cls, PRESETS.get(verb), [*NEEDED.get(verb, []), example]) is not None
    # every key's field comment is shown under it: spot-check one per verb from the source
    from selfflow.config import config_keys

    commented = [(key, comment) for key, _, _, comment in config_keys(cls) if comment]
    assert commented, verb
    key, comment = commented[0]
    assert key in text and " ".join(comment.split()[:4]) in " ".join(text.split())


def test_an_unknown_key_suggests_the_closest():
    from selfflow.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match=r"unknown key model\.hiden_size \(did you mean model\.hidden_size\?"):
        load_config(PretrainConfig, None, ["model.hiden_size=64"])


def help_probe(keys_file: Path, *lines: str) -> str:
    """Run `selfflow train --help` in a fresh interpreter with `cli.HELP_KEYS` at `keys_file`."""
    import subprocess
    import sys

    probe = "\n".join(
        [
            "import sys, contextlib, io",
            "from pathlib import Path",
            "import selfflow.cli as cli",
            f"cli.HELP_KEYS = Path({str(keys_file)!r})",
            "out = io.StringIO()",
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):",
            "    cli.main(['train', '--help'])",
            *lines,
        ]
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO).stdout


def test_help_does_not_import_deepspeed(tmp_path):
    """DeepSpeed, diffusers, transformers and MLflow (seconds each to import) are loaded when a job
    runs, not for `--help`, even when it builds the key listing from the config classes."""
    heavy = "heavy = [m for m in ('deepspeed', 'diffusers', 'transformers', 'mlflow') if m in sys.modules]"
    out = help_probe(tmp_path / "absent.json", heavy, "print(heavy, 'selfflow.training.engine' in sys.modules)")
    assert out.split() == ["[]", "True"]  # the training modules were read, none of the heavy libraries


def test_help_keys_file_serves_help_without_importing_torch_and_only_for_its_source(tmp_path):
    """`make help-keys` precomputes every verb's key listing for the exact source: `--help` then
    imports no torch (the listing is read, not built); a file written for other source is ignored."""
    import subprocess
    import sys

    keys_file = tmp_path / "help_keys.json"
    write = f"import selfflow.cli as cli; from pathlib import Path; cli.HELP_KEYS = Path({str(keys_file)!r}); "
    subprocess.run([sys.executable, "-c", write + "cli.write_help_keys()"], check=True, cwd=REPO)
    built = help_probe(tmp_path / "absent.json", "print(out.getvalue())")
    served = help_probe(keys_file, "print(out.getvalue())", "print('torch imported:', 'torch' in sys.modules)")
    assert served.rstrip().endswith("torch imported: False")
    assert served.rsplit("torch imported:", 1)[0] == built  # the same help, keys and comments included
    stale = json.loads(keys_file.read_text()) | {"source": "0" * 64}
    keys_file.write_text(json.dumps({**stale, "epilogs": {"train": "config keys: STALE"}}))
    ignored = help_probe(keys_file, "print(out.getvalue())")
    assert "STALE" not in ignored and ignored == built


def test_periodic_evaluation_scores_only_the_trained_modalities():
    """An image-only run of a config made for three modalities keeps the default model's untrained
    video and audio projections; its periodic evaluation must not sample them (it stopped the run at
    its first evaluation with a token-width error)."""
    from selfflow.pretrain import PretrainConfig

    demo = REPO / "configs/train/demo.yaml"
    image_only = ["modalities.video=null", "modalities.audio=null", "modalities.image.probability=1.0"]
    cfg = load_config(PretrainConfig, demo, image_only)
    assert cfg.eval_every and cfg.eval.modalities == ["image"]
    assert load_config(PretrainConfig, demo).eval.modalities == ["image", "video", "audio"]
    with pytest.raises(ValueError, match=r"eval.modalities \['audio'\] names no modality this run trains"):
        load_config(PretrainConfig, demo, [*image_only, "eval.modalities=[audio]"])
