"""A trained model folder (`selfflow export`) as a pipeline: `from_pretrained`, then sample from a prompt.

    from selfflow.pipeline import SelfFlowPipeline
    pipe = SelfFlowPipeline.from_pretrained("runs/demo/export/ema")
    media = pipe("two small red circles left of a large blue square", modality="image", seed=0)
    # image (N, 3, H, W), video (N, 3, T, H, W), audio (N, C, S), all in [-1, 1]

    selfflow generate --model runs/demo/export/ema prompt="a red circle moving right" modality=video

Nothing is downloaded: the folder holds the weights, the trunk config, the sentencepiece model and
each modality's autoencoder config; an autoencoder with weights (SD-VAE, FLUX.2 AE, Wan2.2, Oobleck)
is referenced by the local path it was prepared with (`autoencoders={"image": "/models/vae"}`
points elsewhere). Sample i of a call draws all of its noise from a generator seeded by
`(seed, i)`, exactly as `selfflow eval` does, so the same prompt, seed and sampler give the same
media. Class-conditional models take `label=` instead of (or besides) a prompt.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from selfflow.backbone.checkpoint import load_weights
from selfflow.backbone.mmdit import MMDiT
from selfflow.backbone.sit import SiT
from selfflow.backbone.trunk import trunk_config
from selfflow.eval.generate import EvalSet, decode, generate
from selfflow.flow.samplers import SamplerConfig
from selfflow.modalities.base import Modality
from selfflow.modalities.builder import ModalityConfig, build_modality
from selfflow.modalities.text import HFTextEncoder, SentencePieceTokenizer, TextConfig

FORMAT = "selfflow-model-1"


def default_sampler() -> SamplerConfig:
    """Euler, 50 steps, no guidance: the settings `selfflow eval` reports by default."""
    return SamplerConfig(kind="euler", num_steps=50, cfg_scale=1.0)


class SelfFlowPipeline:
    """Trunk + text encoder + autoencoders of an exported model folder."""

    def __init__(self, model: MMDiT | SiT, config: dict, modalities: dict, folder: Path, autoencoders: dict):
        self.model, self.config, self.folder = model.eval(), config, folder
        self.entries = modalities
        self.autoencoder_paths = autoencoders
        self._adapters: dict[str, Modality] = {}
        self._text = None

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, autoencoders: dict[str, str] | None = None, device: str = "cpu"
    ) -> "SelfFlowPipeline":
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: is {folder} a folder written by `selfflow export`?")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: format {config.get('format')!r}, expected {FORMAT!r}")
        model_cfg = trunk_config(config["model"])
        model = SiT(model_cfg) if model_cfg.kind == "sit" else MMDiT(model_cfg)
        report = load_weights(model, folder / "model.safetensors")
        if [k for k in report.missing if k != "pos_embed"] or report.unexpected:
            raise ValueError(f"{folder / 'model.safetensors'}: {report}")
        modalities = json.loads((folder / "modalities.json").read_text())
        return cls(model.to(device), config, modalities, folder, dict(autoencoders or {}))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def adapter(self, name: str) -> Modality:
        """The modality's autoencoder + patching, as the data was prepared."""
        if name not in self._adapters:
            if name not in self.entries:
                known = sorted(self.entries) or "none (the model was trained on in-memory synthetic latents)"
                raise ValueError(f"modality {name!r}: this model decodes {known}")
            adapter = dict(self.entries[name]["modality"])
            if name in self.autoencoder_paths:
                adapter["path"] = self.autoencoder_paths[name]
            if adapter.get("stats"):
                adapter["stats"] = str(self.folder / adapter["stats"])
            self._adapters[name] = build_modality(ModalityConfig(**adapter)).to(self.device)
        return self._adapters[name]

    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """Text ids (or features) and mask as training saw them; a prompt longer than the model reads is an error."""
        text = self.config.get("text")
        if not text:
            return None, None
        cfg = TextConfig(**{**text["config"], "path": str(self.folder / text["config"]["path"])})
        if cfg.kind == "sentencepiece":  # the model folder's own copy
            self._text = self._text or SentencePieceTokenizer(cfg.path, cfg.max_length)
            values, mask, lengths = self._text(prompts)
        else:  # a T5 / causal-LM folder, referenced by the local path it was prepared with
            self._text = self._text or HFTextEncoder(replace(cfg, path=text["config"]["path"]), self.device)
            values, mask, lengths = self._text.encode(prompts)
            values = values.cpu()
        for prompt, n in zip(prompts, lengths.tolist(), strict=True):
            if n > cfg.max_length:
                raise ValueError(f"prompt {prompt!r} is {n} tokens; this model reads at most {cfg.max_length}")
        longest = max(1, int(mask.sum(dim=1).max()))  # cut trailing padding, as training's batches do
        return values[:, :longest], mask[:, :longest].cpu()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        modality: str = "image",
        num_samples: int = 1,
        sampler: SamplerConfig | None = None,
        seed: int = 0,
        label: int | None = None,
    ) -> Tensor:
        """`num_samples` media for one prompt (or one per prompt of a list), decoded, in [-1, 1]."""
        sampler = sampler or default_sampler()
        if isinstance(self.model, SiT):
            return self._sit(modality, num_samples, sampler, seed, label)
        prompts = [prompt] * num_samples if isinstance(prompt, str) or prompt is None else list(prompt)
        if self.model.cfg.context_dim and any(p is None for p in prompts):
            raise ValueError("this model is text-conditioned: give a prompt")
        if label is not None:
            raise ValueError("label= samples class-conditional SiT models; an MMDiT is sampled from prompts")
        adapter = self.adapter(modality)
        entry = self.entries[modality]
        latent_shape = tuple(entry["latent_shape"])
        _, ids = adapter.tokenize(torch.zeros(1, *latent_shape, device=self.device))
        n = len(prompts)
        text, mask = self.encode_prompt([p or "" for p in prompts]) if self.model.cfg.context_dim else (None, None)
        items = EvalSet(
            modality,
            torch.zeros(n, ids.shape[1], entry["token_dim"]),
            ids.cpu().expand(n, -1, -1),
            text,
            mask,
            latent_shape,
            prompts,
            [{} for _ in prompts],
            [str(i) for i in range(n)],
        )
        tokens = generate(self.model, items, sampler, seed)
        return decode(adapter, tokens.to(self.device), items).cpu()

    def _sit(self, modality: str, n: int, sampler: SamplerConfig, seed: int, label: int | None) -> Tensor:
        from selfflow.eval.sample import SampleConfig, sample_latents

        cfg = self.model.cfg
        if modality != "image":
            raise ValueError(f"a SiT generates images, not {modality!r}")
        if label is None or not 0 <= label < cfg.null_class:
            raise ValueError(f"a class-conditional SiT needs label= in [0, {cfg.null_class}), got {label}")
        sample_cfg = SampleConfig(model=cfg, sampler=sampler, num_samples=n, classes=[label], seed=seed)
        latents = sample_latents(self.model, sample_cfg, list(range(n)), self.device)
        if "image" in self.entries:  # the autoencoder the latents were prepared with
            return self.adapter("image").decode(latents).float().clamp(-1, 1).cpu()
        if cfg.in_channels != 3:
            raise ValueError("this SiT was trained on in-memory latents: no autoencoder to decode them")
        return latents.clamp(-1, 1).cpu()


@dataclass
class GenerateConfig:
    model: str = ""  # a model folder written by `selfflow export`
    prompt: str | None = None  # the caption to follow (text-conditioned models)
    label: int | None = None  # the class (class-conditional models)
    modality: str = "image"  # image | video | audio (one the model was trained on)
    num_samples: int = 1
    seed: int = 0  # sample i is seeded by (seed, i)
    # Euler 50 steps without guidance: the settings `selfflow eval` reports; cfg_scale > 1 guides
    sampler: SamplerConfig = field(default_factory=default_sampler)
    out_dir: str = "outputs/generate"
    autoencoders: dict[str, str] = field(default_factory=dict)  # modality -> local autoencoder folder (elsewhere)
    device: str = "cpu"
    fps: int = 8  # video files' frame rate (the built-in clips' rate; the model itself has no clock)

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: give the folder `selfflow export` wrote (e.g. runs/demo/export/ema)")
        if self.num_samples < 1 or self.fps < 1:
            raise ValueError(f"num_samples and fps must be >= 1, got {self.num_samples}, {self.fps}")


def run_generate(cfg: GenerateConfig) -> list[Path]:
    """Sample and write PNG / MP4 / WAV files with a JSON sidecar each (prompt, sampler, steps, CFG, seed)."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    from selfflow.data.synth_visual import encode_mp4, pick_video_codec
    from selfflow.eval.media import save_wav, to_uint8

    pipe = SelfFlowPipeline.from_pretrained(cfg.model, cfg.autoencoders, cfg.device)
    media = pipe(cfg.prompt, cfg.modality, cfg.num_samples, cfg.sampler, cfg.seed, cfg.label)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, item in enumerate(media):
        meta = {
            "prompt": cfg.prompt,
            "label": cfg.label,
            "modality": cfg.modality,
            "seed": cfg.seed,
            "index": i,
            "noise_seed": "(seed, index) as selfflow eval: selfflow.eval.sample.sample_seed",
            "sampler": asdict(cfg.sampler),
            "model": str(Path(cfg.model).resolve()),
            "step": pipe.config.get("step"),
        }
        stem = out / f"{cfg.modality}-{cfg.seed}-{i:04d}"
        if cfg.modality == "image":
            info = PngImagePlugin.PngInfo()
            info.add_text("selfflow", json.dumps(meta))
            path = stem.with_suffix(".png")
            Image.fromarray(to_uint8(item[None])[0]).save(path, pnginfo=info)
        elif cfg.modality == "video":
            frames = to_uint8(item[None])[0]  # (T, H, W, 3)
            path = stem.with_suffix(".mp4")
            if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p: even sides
                frames = np.ascontiguousarray(frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2])
            path.write_bytes(encode_mp4(frames, cfg.fps, pick_video_codec()))
        else:
            rate = pipe.adapter("audio").sample_rate
            path = save_wav(item.numpy(), rate, stem.with_suffix(".wav"))
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        written.append(path)
    return written
