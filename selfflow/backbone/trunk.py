"""Which trunk a config describes: `MMDiTConfig` (kind "mmdit") or `SiTConfig` (kind "sit").

The one place that picks the trunk class from a config; `selfflow train` takes either under `model`
(`model.kind`), and exports record the kind in their metadata.

    model = build_trunk(SiTConfig.xl_2())                   # or an MMDiTConfig
    cfg = trunk_config({"kind": "sit", "depth": 6, ...})    # a saved config section -> the right dataclass
"""

import torch
from torch import nn

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.backbone.sit import SiTConfig, build_sit

TrunkConfig = MMDiTConfig | SiTConfig


def build_trunk(cfg: TrunkConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The initialised trunk of `cfg` (built on the meta device and materialised once)."""
    if isinstance(cfg, SiTConfig):
        return build_sit(cfg, device)
    if isinstance(cfg, MMDiTConfig):
        return build_mmdit(cfg, device)
    raise TypeError(f"not a trunk config: {type(cfg).__name__}")


def trunk_config(section: dict) -> TrunkConfig:
    """A saved model section (a dict) as its config class; without `kind` it is an MMDiT (older exports)."""
    kind = section.get("kind", "mmdit")
    if kind == "sit":
        return SiTConfig(**section)
    if kind == "mmdit":
        return MMDiTConfig(**section)
    raise ValueError(f"model kind must be 'mmdit' or 'sit', got {kind!r}")
