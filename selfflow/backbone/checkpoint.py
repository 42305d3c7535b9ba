"""Load trunk weights from a file or a state dict, whatever wrapper it came in.

Accepts `.safetensors` files, `.pt`/`.pth`/`.ckpt` files that torch's weights-only unpickler can
read (no file may run code: anything else is refused with the command that converts it), or an
in-memory dict;
unwraps `ema` / `model` / `state_dict` wrappers (EMA first by default: those are the weights
people sample from), strips `module.` (DDP/DeepSpeed) and `_orig_mod.` (torch.compile)
prefixes, and reports missing and unexpected keys. A shape mismatch is a `ValueError` naming
the key and both shapes.

    report = load_weights(model, "selfflow_imagenet256.pt")
    print(report)   # missing / unexpected keys, which wrapper was used
    model, meta = load_export("runs/demo/export/ema.safetensors")   # a `selfflow export` file (MMDiT or SiT)
"""

import argparse
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from selfflow.backbone.mmdit import MMDiT
from selfflow.backbone.sit import SiT
from selfflow.backbone.trunk import trunk_config

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


# What a training script commonly pickles beside its tensors and what the weights-only unpickler
# may rebuild without running code: argparse's Namespace of hyperparameters (SiT / REPA / DiT).
SAFE_GLOBALS = [argparse.Namespace]

CONVERT_HINT = (
    "selfflow reads .pt files with torch's weights-only unpickler only (anything else could run code "
    "hidden in the file). If you trust this file and the global named above is a plain data class (a "
    "function such as os.system means the file runs code: do not), convert it once to safetensors with "
    "that one class allowed, still through the weights-only unpickler, and pass the result instead:\n"
    '  python -c "import torch; from safetensors.torch import save_file; from MODULE import CLASS; '
    "torch.serialization.add_safe_globals([CLASS]); "
    "sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('ema', sd); "
    "save_file({{k: v.contiguous() for k, v in sd.items()}}, '{stem}.safetensors')\""
)


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file into a dict without running code from it; a bad file is a clear error.

    `.safetensors` files hold tensors only; `.pt`/`.pth`/`.ckpt` files go through torch's weights-only
    unpickler (tensors, containers, numbers, strings, argparse Namespaces). A file that needs any
    other Python object is refused with the command that converts it to safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        hint = CONVERT_HINT.format(path=path, stem=path.with_suffix(""))
        raise ValueError(f"refusing to unpickle {path}: {unpickling_reason(err)}\n{hint}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def unpickling_reason(err: Exception) -> str:
    """The line of torch's weights-only error that names the refused global."""
    lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return lines[0].strip() if lines else "it holds Python objects besides tensors"


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


def load_export(path: str | Path) -> tuple[MMDiT | SiT, dict[str, str]]:
    """The exported model (eval mode, fp32; an MMDiT or a SiT, by the config's `kind`) and the file's metadata.

    Loaded strictly, except for what the file cannot hold or an older export lacks: SiT's fixed position
    table (a buffer, rebuilt from the config) and the projector's biases of exports written before the
    MMDiT's head had biases (zeroed, which is exactly the old bias-free head).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"export not found: {path} (write one with `selfflow export --run RUN_DIR --out {path}`, "
            "or give the run folder itself: checkpoint=RUN_DIR exports its newest checkpoint first)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # a pickle or a damaged file: safetensors reads its header and nothing else
        raise ValueError(f"{path} is not a safetensors file written by `selfflow export` ({err})") from None
    if meta.get("format") != "selfflow-export-1":
        raise ValueError(f"{path} is not a selfflow export (metadata format {meta.get('format')!r})")
    cfg = trunk_config(json.loads(meta["model_config"]))
    model = SiT(cfg) if cfg.kind == "sit" else MMDiT(cfg)
    report = load_weights(model, path)
    old_biases = [k for k in report.missing if k.startswith("projector.") and k.endswith(".bias")]
    missing = [k for k in report.missing if k != "pos_embed" and k not in old_biases]
    if missing or report.unexpected:
        raise ValueError(str(report))
    with torch.no_grad():
        for name in old_biases:
            model.get_parameter(name).zero_()
    return model.eval(), meta
