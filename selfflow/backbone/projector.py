"""The two projector heads a trunk can carry for its representation loss (DESIGN.md section 2).

- `SelfFlowHead` (kind `"selfflow"`): the public Self-Flow release's `SimpleHead` (black-forest-labs/
  Self-Flow `src/model.py`; parameter names and shapes as in `selfflow_imagenet256.pt` and the reference
  fixture): `Linear(D, D + d) -> SiLU -> Linear(D + d, d)`, with biases. Self-Flow aligns it to the EMA
  teacher's raw hidden state, so `d = D`. Size at the paper's width D = d = 1152:
  1152 * 2304 + 2304 + 2304 * 1152 + 1152 = 5,311,872 parameters (5.3M). The paper states "about 10M"
  extra parameters for its projector; the release's head does not match that figure and no source gives
  a head that does, so the release's head is what is built.
- `RepaHead` (kind `"repa"`): REPA's `build_mlp(hidden_size, projector_dim, z_dim)` (sihyun-yu/REPA
  `models/sit.py`): `Linear(D, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, z)` with biases, h = 2048
  (REPA's `projector_dim` default), z = the external encoder's feature width (768 for DINOv2-B). At
  D = 1152, z = 768: 8,131,328 parameters. Its parameters are `projector.0`, `.2`, `.4` (REPA's own
  checkpoints hold the same layers as `projectors.0.0`, `.2`, `.4`).

    head = build_projector("selfflow", dim=1152, out_dim=1152)
    z = head(h)                                                # (B, L, D) -> (B, L, d)
"""

from torch import Tensor, nn

PROJECTOR_KINDS = ("selfflow", "repa")
REPA_HIDDEN = 2048  # REPA models/sit.py: SiT(projector_dim=2048)


class SelfFlowHead(nn.Module):
    """Self-Flow's projector (the release's `SimpleHead`): `Linear(D, D+d) -> SiLU -> Linear(D+d, d)`."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim + out_dim)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(dim + out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.act(self.linear1(x)))


class RepaHead(nn.Sequential):
    """REPA's projector: `Linear(D, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, z)`."""

    def __init__(self, dim: int, out_dim: int, hidden: int = REPA_HIDDEN):
        super().__init__(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
        )


def build_projector(kind: str, dim: int, out_dim: int, hidden: int = REPA_HIDDEN) -> nn.Module:
    """The head of `kind` from trunk width `dim` to `out_dim` (`hidden`: REPA's inner width only)."""
    if kind == "selfflow":
        return SelfFlowHead(dim, out_dim)
    if kind == "repa":
        return RepaHead(dim, out_dim, hidden)
    raise ValueError(f"projector kind must be one of {PROJECTOR_KINDS}, got {kind!r}")


def check_projector(kind: str | None, hidden: int) -> None:
    """Shared validation of a model config's `projector_kind` / `projector_hidden` (a ValueError naming them)."""
    if kind is not None and kind not in PROJECTOR_KINDS:
        raise ValueError(f"projector_kind must be one of {PROJECTOR_KINDS} (or null), got {kind!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"projector_hidden must be a positive integer, got {hidden!r}")
