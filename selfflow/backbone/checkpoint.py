"""Load trunk weights from a file or a state dict, whatever wrapper it came in.

Accepts `.pt`/`.pth`/`.ckpt` (torch.load) and `.safetensors` files or an in-memory dict;
unwraps `ema` / `model` / `state_dict` wrappers (EMA first by default: those are the weights
people sample from), strips `module.` (DDP/DeepSpeed) and `_orig_mod.` (torch.compile)
prefixes, and reports missing and unexpected keys. A shape mismatch is a `ValueError` naming
the key and both shapes.

    report = load_weights(model, "selfflow_imagenet256.pt")
    print(report)   # missing / unexpected keys, which wrapper was used
    model, meta = load_export("runs/demo/export/ema.safetensors")   # a `selfflow export` file
"""

import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from selfflow.backbone.mmdit import MMDiT, MMDiTConfig

WRAPPERS = ("ema", "model", "state_dict", "module")
PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    source: str
    wrapper: str | None  # the key the weights were found under, None for a bare state dict
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.source}" + (f" [{self.wrapper}]" if self.wrapper else "")]
        lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing) or '-'}")
        lines.append(f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected) or '-'}")
        return "\n".join(lines)


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file into a dict; a missing or unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # pickled non-tensor objects (an argparse Namespace next to the weights is common)
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    warnings.warn(f"{path} holds pickled objects besides tensors; loading it with weights_only=False", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def extract_state_dict(obj: dict, prefer: tuple[str, ...] = WRAPPERS) -> tuple[dict[str, Tensor], str | None]:
    """Unwrap nested `ema`/`model`/`state_dict` dicts (in `prefer` order) and strip prefixes."""
    wrapper = None
    while not _is_state_dict(obj):
        key = next((k for k in prefer if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise ValueError(f"no state dict found; top-level keys: {sorted(obj)[:20]}")
        obj, wrapper = obj[key], key if wrapper is None else f"{wrapper}.{key}"
    return {_strip(k): v for k, v in obj.items()}, wrapper


def load_weights(
    model: nn.Module, source: str | Path | dict, prefer: tuple[str, ...] = WRAPPERS, strict: bool = False
) -> LoadReport:
    """Load weights into `model` in place; with `strict`, missing or unexpected keys raise."""
    name = str(source) if not isinstance(source, dict) else "<state dict>"
    raw = read_checkpoint(source) if not isinstance(source, dict) else source
    state, wrapper = extract_state_dict(raw, prefer)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{name}: shape mismatch for {key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    report = LoadReport(name, wrapper, sorted(set(own) - set(state)), sorted(set(state) - set(own)))
    if strict and (report.missing or report.unexpected):
        raise ValueError(str(report))
    model.load_state_dict(state, strict=False)
    return report


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key.replace("._orig_mod.", ".")


def load_export(path: str | Path) -> tuple[MMDiT, dict[str, str]]:
    """The exported model (eval mode, fp32) and the file's metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "selfflow-export-1":
        raise ValueError(f"{path} is not a selfflow export (metadata format {meta.get('format')!r})")
    model = MMDiT(MMDiTConfig(**json.loads(meta["model_config"])))
    load_weights(model, path, strict=True)
    return model.eval(), meta
