"""Mean and standard deviation over seeds, and which differences between methods exceed that spread.

`selfflow report` groups runs whose folders differ only in their seed: `runs/compare/fm/seed0`,
`runs/compare/fm/seed1`, ... (a folder named `seed<N>` belongs to the group named by its parent
folder) or `fm_seed0`, `fm_seed1`, ... (a `_seed<N>` or `-seed<N>` suffix). Per group and metric,
in float64:

    mean = sum(x) / n        std = sqrt(sum((x - mean)^2) / (n - 1))     (sample std; none for n = 1)

Two groups' means differ beyond noise when

    |mean_a - mean_b| > 2 * pooled std,   pooled std = sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))

i.e. when the gap is more than twice the seed-to-seed spread of a single run. With 3 seeds per
group this is Student's t = 2 / sqrt(2/3) = 2.45 on 4 degrees of freedom, a two-sided p of 0.07
under normal, equal-variance noise (with 5 seeds: t = 3.16, p = 0.013). Every other pair is
reported as within noise; with one run per group there is no spread and no verdict.

    seed_of("runs/compare/fm/seed1")  # ("fm", 1)
    spread([176.9, 160.2, 181.0])  # Spread(n=3, mean=172.7, std=11.0)
    verdict("fd_builtin", {"fm": spread([...]), "selfflow": spread([...])})  # one line of text
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

NOISE_FACTOR = 2.0  # a difference of means beyond NOISE_FACTOR * pooled std is reported as beyond noise
SEED_FOLDER = re.compile(r"^(?:(?P<stem>.+?)[_-])?seed(?P<seed>\d+)$")


def seed_of(folder: str | Path) -> tuple[str, int | None]:
    """`(group, seed)` of a run folder: `.../fm/seed2` -> ("fm", 2), `.../fm_seed2` -> ("fm", 2),
    `.../fm` -> ("fm", None)."""
    folder = Path(folder)
    match = SEED_FOLDER.match(folder.name)
    if match is None:
        return folder.name, None
    return match["stem"] or folder.resolve().parent.name, int(match["seed"])


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1 in the denominator); None for n = 1


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(n, mean, std)


def pooled_std(a: Spread, b: Spread) -> float | None:
    """The seed-to-seed spread of one run, pooled over both groups; None with no degree of freedom."""
    dof = a.n + b.n - 2
    if dof == 0:
        return None
    return math.sqrt(((a.n - 1) * (a.std or 0.0) ** 2 + (b.n - 1) * (b.std or 0.0) ** 2) / dof)


def beyond_noise(a: Spread, b: Spread) -> bool | None:
    """Whether the means differ by more than NOISE_FACTOR pooled stds; None when there is no spread."""
    pooled = pooled_std(a, b)
    if pooled is None:
        return None
    return abs(a.mean - b.mean) > NOISE_FACTOR * pooled


def verdict(metric: str, groups: dict[str, Spread], fmt=lambda v: f"{v:.4g}") -> str:
    """One line on `metric`: the pairs of groups whose means differ beyond noise, then how many pairs
    are within it."""
    names = list(groups)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    if not pairs:
        return f"{metric}: one group, nothing to compare"
    flags = [beyond_noise(groups[a], groups[b]) for a, b in pairs]
    undecided = flags.count(None)
    if undecided == len(pairs):
        return f"{metric}: one run per group, no spread to compare against"
    beyond = []
    for (a, b), flag in zip(pairs, flags, strict=True):
        if flag:
            (lo, lo_name), (hi, hi_name) = sorted([(groups[a].mean, a), (groups[b].mean, b)])
            limit = NOISE_FACTOR * pooled_std(groups[a], groups[b])
            beyond.append(f"{lo_name} {fmt(lo)} < {hi_name} {fmt(hi)} (gap {fmt(hi - lo)} > {fmt(limit)})")
    within = flags.count(False)
    line = f"{metric}: beyond noise (gap > {NOISE_FACTOR:g} × pooled std): {'; '.join(beyond) or 'none'}. "
    line += f"Within noise: {'all' if within == len(pairs) else within} of {len(pairs)} pairs."
    return line + (f" No spread for {undecided} pairs (one run each)." if undecided else "")
