"""`selfflow eval` and `selfflow report` on the built-in data: seeding, the null condition, the full
train -> periodic eval -> export -> eval -> report path, and what lands in MLflow."""

import base64
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from train_runs import REPO, launch, torchrun

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.cli import main
from selfflow.eval.builtin_features import attribute_targets, load_feature_net, train_feature_net
from selfflow.eval.encoders import RepaEncoder
from selfflow.eval.evaluate import EvalConfig, evaluate, flat
from selfflow.eval.generate import generate, read_eval_set
from selfflow.eval.media import save_spectrograms
from selfflow.eval.probe import fit_logistic, linear_probe, linear_probes, probe_features
from selfflow.flow.samplers import SamplerConfig

SMALL = ["num_images=24", "num_videos=12", "num_audio=12", "samples_per_shard=8"]
MODALITIES = ("image", "video", "audio")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Raw and prepared built-in data plus quickly trained built-in feature nets."""
    root = tmp_path_factory.mktemp("evaldata")
    assert main(["synth", "--config", "configs/data/synth.yaml", f"out_dir={root / 'raw'}", *SMALL]) == 0
    prepare = ["prepare", "--config", "configs/data/prepare_tiny.yaml", f"raw_dir={root / 'raw'}"]
    assert main([*prepare, f"out_dir={root / 'lat'}"]) == 0
    for m in MODALITIES:
        train_feature_net(m, root / "raw" / m, root / "nets" / f"{m}.safetensors", steps=10)
    return root


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = MMDiTConfig(
        hidden_size=32,
        num_heads=2,
        depth_double=1,
        depth_single=1,
        axes_dim=[4, 6, 6],
        context_dim=16,
        text_vocab=256,
        text_max_length=64,
        num_classes=0,
        projector_dim=0,
        modalities={"image": [12, 12], "video": [192, 192], "audio": [400, 400]},
    )
    model = build_mmdit(cfg)
    for p in model.parameters():  # non-zero everywhere, so outputs depend on every input
        p.data.normal_(0, 0.05)
    return model.eval()


def test_a_modality_the_model_was_not_trained_on_is_refused_before_sampling(data, tmp_path):
    """A model from an image-only run still has untrained video and audio projections at the default
    widths; evaluating it on data whose video tokens are another width names the fix up front."""
    model = tiny_model()
    model.cfg.modalities["video"] = [48, 48]  # what the data does not have (192-wide tokens)
    cfg = EvalConfig(data=str(data / "lat"), feature_nets=str(data / "nets"), num_samples=2)
    with pytest.raises(ValueError, match=r"video tokens 192 wide, the model's video input is 48 wide") as err:
        evaluate(model, cfg, tmp_path / "out", step=0)
    assert "eval.modalities" in str(err.value) and not (tmp_path / "out").exists()  # nothing sampled


def test_sample_depends_only_on_its_index(data):
    items = read_eval_set(data / "lat", "image", 6)
    model = tiny_model()
    sampler = SamplerConfig(kind="sde", num_steps=4, cfg_scale=2.0)
    whole = generate(model, items, sampler, seed=3, batch_size=6)
    pieces = generate(model, items, sampler, seed=3, batch_size=4)
    alone = generate(model, items, sampler, seed=3, indices=[4])
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], whole[4], rtol=0, atol=1e-5)
    other_seed = generate(model, items, sampler, seed=4, indices=[4])
    assert (other_seed[0] - whole[4]).abs().max() > 0.1


def test_guidance_uses_a_null_condition_that_ignores_the_text(data):
    """With guidance the sampler's unconditional half sees every text token masked out: the same
    velocity whatever the caption, i.e. what training's condition dropout taught."""
    items = read_eval_set(data / "lat", "image", 2)
    model = tiny_model()
    x, t = torch.randn(1, *items.x0.shape[1:]), torch.full((1,), 0.7)
    ids = items.ids[:1]
    null = [torch.zeros_like(items.text_mask[i : i + 1]) for i in range(2)]
    with torch.no_grad():
        v0 = model(x, t, ids, txt=items.text[0:1], txt_mask=null[0], modality="image")
        v1 = model(x, t, ids, txt=items.text[1:2], txt_mask=null[1], modality="image")
        v_text = model(x, t, ids, txt=items.text[0:1], txt_mask=items.text_mask[0:1], modality="image")
    torch.testing.assert_close(v0, v1)
    assert (v_text - v0).abs().max() > 1e-4
    # and the guided sample differs from the unguided one
    guided = generate(model, items, SamplerConfig(kind="euler", num_steps=3, cfg_scale=3.0), seed=0)
    plain = generate(model, items, replace(SamplerConfig(kind="euler", num_steps=3), cfg_scale=1.0), seed=0)
    assert (guided - plain).abs().max() > 1e-4


def test_train_eval_report_end_to_end(data, tmp_path):
    run = tmp_path / "run"
    eval_keys = [
        "eval_every=3",
        f"eval.data={data / 'lat'}",
        f"eval.feature_nets={data / 'nets'}",
        "eval.num_samples=4",
        "eval.sampler.num_steps=3",
        "eval.save_media=2",
        "eval.probe_layer=1",
        "eval.probe_items=8",
        "eval.guided_cfg=2.0",
    ]
    shards = [f"modalities.{m}.shards={data / 'lat' / m}" for m in MODALITIES]
    # two processes: the periodic evaluation splits the items between them, the final one runs alone
    launch(2, run, "steps=3", "save_every=3", *shards, *eval_keys, config=REPO / "configs/train/tiny_synth.yaml")

    periodic = json.loads((run / "evals" / "step_0000003" / "eval.json").read_text())
    assert periodic["step"] == 3 and set(periodic["metrics"]) == set(MODALITIES)
    for name, metrics in periodic["metrics"].items():
        assert metrics["fd_builtin"] > 0
        # the real reference decoded through the same path scores as the raw data does: a scrambled
        # decode (wrong axis order, wrong scaling) would fail the signal-processing checks
        assert metrics["caption_accuracy_real"]["overall"] >= 0.9, name
    assert periodic["metrics"]["video"]["fvd"] > 0
    assert periodic["metrics"]["audio"]["linear_probe"]["test_items"] == 2
    assert set(periodic["weights_sha256"]) >= {"builtin_image", "builtin_video", "builtin_audio", "i3d_kinetics400"}

    record = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    logged = client.get_metric_history(record["run_id"], "eval/image/fd_builtin")
    assert [(m.step, m.value) for m in logged] == [(3, pytest.approx(periodic["metrics"]["image"]["fd_builtin"]))]
    guided = client.get_metric_history(record["run_id"], "eval/image/guided/fd_builtin")
    assert [m.value for m in guided] == [pytest.approx(periodic["metrics"]["image"]["guided"]["fd_builtin"])]
    noised = client.get_metric_history(record["run_id"], "eval/audio/linear_probe_t0.5")
    assert [m.value for m in noised] == [pytest.approx(periodic["metrics"]["audio"]["linear_probe_t0.5"]["accuracy"])]

    export = tmp_path / "ema.safetensors"
    assert main(["export", "--run", str(run), "--out", str(export)]) == 0
    out = tmp_path / "final"
    job = [f"checkpoint={export}", f"out_dir={out}", "device=cpu", *eval_keys[1:]]
    assert main(["eval", *job]) == 0
    final = json.loads((out / "eval.json").read_text())
    assert final["checkpoint"]["step"] == 3 and final["protocol"]["num_samples"] == 4
    # the same weights, seeds and protocol as the periodic evaluation: the same numbers
    for name in MODALITIES:
        assert final["metrics"][name]["fd_builtin"] == pytest.approx(periodic["metrics"][name]["fd_builtin"], rel=1e-4)
    assert (out / "samples" / "image_grid.png").is_file() and (out / "samples" / "video_001.gif").is_file()
    # a run folder instead of an export: its latest checkpoint is exported first, same weights
    from_run = tmp_path / "from_run"
    assert main(["eval", f"checkpoint={run}", f"out_dir={from_run}", *job[2:], "eval.modalities=[image]"]) == 0
    again = json.loads((from_run / "eval.json").read_text())["metrics"]["image"]["fd_builtin"]
    assert again == pytest.approx(final["metrics"]["image"]["fd_builtin"], rel=1e-6)

    report = tmp_path / "report"
    assert main(["report", f"runs=[{run},{out}]", f"out_dir={report}"]) == 0
    page, markdown = (report / "report.html").read_text(), (report / "report.md").read_text()
    fd = periodic["metrics"]["audio"]["fd_builtin"]
    assert f"{fd:.3f}" in markdown or f"{fd:.1f}" in markdown
    for path in ("media/loss.png", "media/run_step3_image_grid.png", "media/final_step3_audio_000.wav"):
        # copied beside the page, and embedded in it byte for byte (the page stands alone in MLflow's viewer)
        assert (report / path).is_file() and base64.b64encode((report / path).read_bytes()).decode() in page
    assert '<audio controls src="data:audio/wav;base64,' in page
    for picture in ("media/final_step3_audio_spectrograms.png", "media/run_step3_real_audio_spectrograms.png"):
        # the clips' spectrograms beside their players: one cell per saved clip, in the page and the markdown
        cells = np.asarray(Image.open(report / picture)).shape
        assert base64.b64encode((report / picture).read_bytes()).decode() in page and f"]({picture})" in markdown
        assert cells == (2 + 256 + 2, 2 + 2 * (125 + 2), 3)  # 2 clips of 1 s at 16 kHz (eval.save_media=2)
    assert "| run (no guidance) |" in markdown and "| run (CFG 2) |" in markdown
    assert (report / "media/run_step3_guided_image_grid.png").is_file()
    real = report / "media/run_step3_real_image_grid.png"  # the real items beside the samples (decoded latents)
    assert real.is_file() and "media/run_step3_real_image_grid.png" in page and "real items" in page
    grid, samples = (np.asarray(Image.open(p)) for p in (real, report / "media/run_step3_image_grid.png"))
    assert grid.std() > 0 and not np.array_equal(grid, samples)
    artifacts = {a.path for a in client.list_artifacts(record["run_id"], "report")}
    assert {"report/report.html", "report/report.md", "report/media"} <= artifacts


def test_spectrogram_picture_shows_each_clip_in_its_cell(tmp_path):
    seconds = np.arange(16000) / 16000
    clips = [np.sin(2 * np.pi * 1000 * seconds), np.zeros(16000), 0.5 * np.sin(2 * np.pi * 3000 * seconds)]
    stereo = np.stack([np.stack([c, c]) for c in clips])  # (N, C, S): the picture shows the channels' mean
    picture = np.asarray(Image.open(save_spectrograms(stereo, 16000, tmp_path / "s.png", columns=2)))
    assert picture.shape == (2 + 2 * (256 + 2), 2 + 2 * (125 + 2), 3)  # 256 bins, 125 hops of 128 samples
    assert (picture[..., 0] == picture[..., 2]).all()  # gray
    cells = [picture[2 + r * 258 : 258 + r * 258, 2 + c * 127 : 127 + c * 127, 0] for r, c in ((0, 0), (0, 1), (1, 0))]
    # a tone lights the row of its FFT bin (f * 512 / 16000), counted from the bottom: 0 dB at full
    # scale is white, half amplitude 20 log10(0.5) = -6.02 dB of the 100 dB range
    for cell, hz, level in ((cells[0], 1000, 255), (cells[2], 3000, 255 * (1 - 6.02 / 100))):
        rows = cell[:, 4:-4].astype(float).mean(axis=1)  # away from the clip's ends
        assert int(np.argmax(rows)) == 255 - hz * 512 // 16000
        assert rows.max() == pytest.approx(level, abs=2)
    assert (cells[1] == 0).all()  # silence: the -100 dB floor, black
    assert (picture[258 + 2 :, 127 + 2 :] == 255).all()  # the grid's empty fourth cell stays white


def test_logistic_probe_separates_what_is_linearly_separable():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen)
    w = torch.randn(8, 3, generator=gen)
    y = (x @ w > 0).float()
    head = fit_logistic(x, y)
    assert ((head(x) > 0).float() == y).float().mean() > 0.98
    noise = (torch.rand(400, 3, generator=gen) > 0.5).float()  # labels unrelated to x
    held_out = fit_logistic(x[:300], noise[:300])
    assert ((held_out(x[300:]) > 0).float() == noise[300:]).float().mean() < 0.75


def test_linear_probe_reports_against_the_majority_baseline(data):
    model = tiny_model()
    first = linear_probe(model, str(data / "lat"), "image", layer=1, items=24)
    assert first == linear_probe(model, str(data / "lat"), "image", layer=1, items=24)  # deterministic
    items = read_eval_set(data / "lat", "image", 24)
    y = torch.from_numpy(np.stack([attribute_targets("image", a) for a in items.attributes]))
    majority = (y[:18].mean(0) > 0.5).float()  # fit on the first 75%, scored on the rest
    assert first["majority"] == pytest.approx(float((y[18:] == majority).float().mean()))
    assert (first["train_items"], first["test_items"]) == (18, 6) and 0 <= first["accuracy"] <= 1


def test_repa_targets_from_the_builtin_feature_net(data):
    """REPA on the built-in data aligns to the image feature net's maps, resized to the token grid."""
    net = load_feature_net(data / "nets" / "image.safetensors")
    encoder = RepaEncoder(data / "nets" / "image.safetensors")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    targets = encoder(images, (16, 16))
    maps = torch.nn.functional.interpolate(net.spatial(images), size=(16, 16), mode="bilinear")
    assert targets.shape == (3, 256, encoder.feature_dim) and encoder.feature_dim == maps.shape[1]
    torch.testing.assert_close(targets, maps.flatten(2).transpose(1, 2))


def test_unguided_and_guided_sets_are_labelled_and_independent(data, tmp_path):
    """The reported set samples without guidance by default; the guided set is exactly what the same
    evaluation with cfg_scale = guided_cfg reports, under its own key, files and MLflow names. The
    numbers do not depend on `save_media` (0: no sample files at all; negative: a config error)."""
    model = tiny_model()
    cfg = EvalConfig(
        data=str(data / "lat"),
        feature_nets=str(data / "nets"),
        modalities=["image", "video"],
        num_samples=4,
        sampler=SamplerConfig(kind="euler", num_steps=3),
        guided_cfg=3.0,
        save_media=2,
    )
    assert EvalConfig().sampler.cfg_scale == 1.0 and EvalConfig().guided_cfg == 0
    both = evaluate(model, cfg, tmp_path / "both", step=0)
    alone = evaluate(
        model, replace(cfg, guided_cfg=0.0, modalities=["image"], save_media=0), tmp_path / "alone", step=0
    )
    as_reported = replace(cfg, sampler=replace(cfg.sampler, cfg_scale=3.0), guided_cfg=0.0)
    guided_alone = evaluate(model, as_reported, tmp_path / "guided_alone", step=0)

    metrics, guided = both["metrics"]["image"], both["metrics"]["image"]["guided"]
    unguided = alone["metrics"]["image"]
    for key in ("fd_builtin", "caption_accuracy", "caption_accuracy_real"):
        assert metrics[key] == unguided[key], key
    # the real items' statistics, computed once and shared by both sets, give the same numbers
    for name, keys in (("image", ["fd_builtin", "caption_accuracy"]), ("video", ["fd_builtin", "fvd"])):
        for key in keys:
            assert both["metrics"][name]["guided"][key] == guided_alone["metrics"][name][key], (name, key)
    assert guided["fd_builtin"] != metrics["fd_builtin"]
    assert alone["media"]["image"]["files"] == [] and alone["media"]["image"]["real"]["files"] == []
    assert not (tmp_path / "alone" / "samples").exists()
    assert "caption_accuracy_real" not in guided and "guided" not in unguided
    assert both["protocol"]["sets"] == {"metrics.<modality>": "no guidance", "metrics.<modality>.guided": "CFG 3"}
    assert alone["protocol"]["sets"] == {"metrics.<modality>": "no guidance"}
    assert guided_alone["protocol"]["sets"] == {"metrics.<modality>": "CFG 3"}
    # MLflow names (`eval/<modality>/<key>`, pretrain.periodic_eval) tell the sets apart
    logged = flat(metrics)
    assert logged["guided/fd_builtin"] == guided["fd_builtin"] and logged["fd_builtin"] == metrics["fd_builtin"]
    assert logged["guided/caption_accuracy"] == guided["caption_accuracy"]["overall"]
    assert both["media"]["image"]["files"] == ["samples/image_grid.png"]
    assert both["media"]["image"]["guided"]["files"] == ["samples/guided_image_grid.png"]
    assert (tmp_path / "both" / "samples" / "guided_image_grid.png").is_file()
    with pytest.raises(ValueError, match="guided_cfg"):
        replace(cfg, guided_cfg=1.0)
    with pytest.raises(ValueError, match="save_media"):
        replace(cfg, save_media=-1)


def test_noised_probe_uses_fixed_noise_at_each_level(data, tmp_path):
    model = tiny_model()
    probes = linear_probes(model, str(data / "lat"), "image", layer=1, items=24, levels=[0.0, 0.25, 0.5], seed=5)
    assert list(probes) == ["linear_probe", "linear_probe_t0.25", "linear_probe_t0.5"]
    assert [p["t"] for p in probes.values()] == [0.0, 0.25, 0.5]
    assert probes["linear_probe"] == linear_probe(model, str(data / "lat"), "image", layer=1, items=24, seed=5)
    assert len({p["majority"] for p in probes.values()}) == 1  # the same items, split and targets at every level

    # the features at t = 0.5: the trunk on x0 halfway to noise drawn from a generator seeded by `seed`
    items = read_eval_set(data / "lat", "image", 24)
    noise = torch.randn(items.x0.shape, generator=torch.Generator().manual_seed(5))
    t = torch.full((24,), 0.5)
    with torch.no_grad():
        hidden = model.hidden_states(0.5 * items.x0 + 0.5 * noise, t, items.ids, layer=1, modality="image")
    features = probe_features(model, items.x0, items.ids, "image", layer=1, t=0.5, seed=5)
    torch.testing.assert_close(features, hidden.mean(dim=1), rtol=1e-5, atol=1e-6)
    clean = probe_features(model, items.x0, items.ids, "image", layer=1, t=0.0, seed=5)
    assert (features - clean).abs().max() > 1e-3

    # in an evaluation: one probe per level, the t = 0 one under its old key, seeded by eval.seed
    cfg = EvalConfig(
        data=str(data / "lat"),
        feature_nets=str(data / "nets"),
        modalities=["image"],
        num_samples=2,
        sampler=SamplerConfig(kind="euler", num_steps=1),
        save_media=1,
        seed=5,
        probe_layer=1,
        probe_items=24,
        probe_noise_levels=[0.0, 0.5],
    )
    result = evaluate(model, cfg, tmp_path / "eval", step=0)
    metrics = result["metrics"]["image"]
    assert metrics["linear_probe"] == probes["linear_probe"]
    assert metrics["linear_probe_t0.5"] == probes["linear_probe_t0.5"]
    assert "linear_probe_t0.25" not in metrics
    assert result["protocol"]["probe"]["noise_levels"] == [0.0, 0.5]
    assert flat(metrics)["linear_probe_t0.5"] == probes["linear_probe_t0.5"]["accuracy"]
    with pytest.raises(ValueError, match="probe_noise_levels"):
        replace(cfg, probe_noise_levels=[0.5, 1.0])


def test_two_processes_evaluate_their_shares_to_the_one_process_numbers(data, tmp_path):
    """`selfflow eval` under torchrun: each of 2 processes samples, decodes and embeds half of the items;
    the merged built-in FD, caption accuracy, FVD and the Inception metrics (random weights: precision,
    recall, KID and IS need every item's features) equal one process's, and the media are the same."""
    from safetensors.torch import save_file

    from selfflow.eval.inception import InceptionV3

    model = tiny_model()
    export = tmp_path / "tiny.safetensors"
    meta = {"format": "selfflow-export-1", "model_config": json.dumps(asdict(model.cfg)), "step": "0"}
    save_file(model.state_dict(), str(export), metadata={**meta, "weights": "ema"})
    torch.manual_seed(0)
    inception = tmp_path / "inception.pth"
    torch.save(
        {k: v for k, v in InceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}, inception
    )
    keys = [f"checkpoint={export}", "device=cpu", f"eval.data={data / 'lat'}", f"eval.feature_nets={data / 'nets'}"]
    keys += ["eval.num_samples=4", "eval.batch_size=2", "eval.sampler.num_steps=2", "eval.save_media=3"]
    keys += [f"eval.inception={inception}"]
    assert main(["eval", *keys, f"out_dir={tmp_path / 'one'}"]) == 0
    proc = torchrun(2, "-m", "selfflow.cli", "eval", *keys, f"out_dir={tmp_path / 'two'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert one["protocol"]["processes"] == 1 and two["protocol"]["processes"] == 2
    for name in MODALITIES:
        numbers = {k: v for k, v in flat(one["metrics"][name]).items() if k != "seconds"}
        assert {"fd_builtin", "caption_accuracy", "caption_accuracy_real"} <= set(numbers)
        for key, value in numbers.items():
            assert flat(two["metrics"][name])[key] == pytest.approx(value, rel=1e-5, abs=1e-8), (name, key)
    assert {"fid", "sfid", "precision", "recall", "kid", "inception_score"} <= set(one["metrics"]["image"])
    assert "fvd" in one["metrics"]["video"] and "fid_frames" in one["metrics"]["video"]
    assert one["weights_sha256"] == two["weights_sha256"]
    for path in ("samples/image_grid.png", "samples/real_image_grid.png", "samples/video_002.gif"):
        assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "two" / path).read_bytes(), path
    assert not (
        tmp_path / "two" / "samples" / "video_003.gif"
    ).exists()  # save_media=3: items 0, 1 (rank 0), 2 (rank 1)


def test_prepare_and_eval_read_shards_over_http(data, tmp_path):
    """Raw shards and prepared data where clusters keep them: a real HTTP server on loopback serves the
    raw and prepared folders; `selfflow prepare` reads raw shards given as an http brace pattern and
    writes what it writes from the local files, and `selfflow eval` of `eval.data=http://...` (shards
    listed by the served manifest) gives the numbers of the local folder."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(data)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        image_only = ["modalities.video=null", "modalities.audio=null", "workers=1"]
        prepare = ["prepare", "--config", "configs/data/prepare_tiny.yaml", *image_only]
        assert main([*prepare, f"raw_dir={data / 'raw'}", f"out_dir={tmp_path / 'local'}"]) == 0
        count = len(list((data / "raw" / "image").glob("*.tar")))
        pattern = f"{base}/raw/image/shard-{{000000..{count - 1:06d}}}.tar"
        assert main([*prepare, f"shards.image={pattern}", f"out_dir={tmp_path / 'remote'}"]) == 0
        for local in sorted((tmp_path / "local" / "image").glob("*.tar")):
            remote = tmp_path / "remote" / "image" / local.name
            assert latent_members(remote) == latent_members(local), local.name

        model = tiny_model()
        export = tmp_path / "tiny.safetensors"
        meta = {"format": "selfflow-export-1", "model_config": json.dumps(asdict(model.cfg)), "step": "0"}
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(export), metadata={**meta, "weights": "ema"})
        keys = [f"checkpoint={export}", "device=cpu", f"eval.feature_nets={data / 'nets'}", "eval.modalities=[image]"]
        keys += ["eval.num_samples=4", "eval.sampler.num_steps=2", "eval.save_media=2"]
        assert main(["eval", *keys, f"eval.data={data / 'lat'}", f"out_dir={tmp_path / 'e_local'}"]) == 0
        assert main(["eval", *keys, f"eval.data={base}/lat", f"out_dir={tmp_path / 'e_remote'}"]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    local, remote = (
        json.loads((tmp_path / d / "eval.json").read_text())["metrics"]["image"] for d in ("e_local", "e_remote")
    )
    assert remote["fd_builtin"] == local["fd_builtin"] and remote["caption_accuracy"] == local["caption_accuracy"]


def latent_members(path) -> dict:
    import webdataset as wds

    return {s["__key__"]: (s["latent.pth"], s["txt"], s["json"]) for s in wds.WebDataset(str(path), shardshuffle=False)}
