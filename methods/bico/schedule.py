"""BiCo's per-stage timestep sampling: most draws from one side of a boundary, the rest from the other.

The official code splits its 1000-step training schedule at index 875 (t ~ 417 on Wan2.1 with shift 5)
and draws 80 % of the timesteps from the favoured side. Within a side, conceptkit keeps the backbone's
own timestep distribution: it draws candidates from the backbone (`make_noisy` on a dummy latent) and
keeps the first one on the chosen side (exact conditional sampling; for Wan2.1 this is the code's
uniform index within the side, as the backbone's shifted-uniform draw is the same distribution).
"""

from __future__ import annotations

import torch

SIDES = ("low", "high")  # low: t < boundary (little noise, detail); high: t >= boundary (much noise, layout)
_CANDIDATES = 256
_MAX_ROUNDS = 64


def opposite(side: str) -> str:
    return "high" if side == "low" else "low"


def side_timesteps(backbone, n: int, boundary: float, favoured: str, fraction: float,
                   generator: torch.Generator) -> torch.Tensor:
    """n timesteps: each row on the `favoured` side with probability `fraction`, else on the other."""
    if favoured not in SIDES:
        raise ValueError(f"favoured side must be one of {', '.join(SIDES)}, got {favoured!r}")
    on_favoured = torch.rand(n, generator=generator) < fraction
    want_high = on_favoured if favoured == "high" else ~on_favoured
    chosen: list[torch.Tensor | None] = [None] * n
    for _ in range(_MAX_ROUNDS):
        candidates = backbone.make_noisy(torch.zeros(_CANDIDATES, 1), generator).timesteps.cpu()
        high = candidates >= boundary
        for row in range(n):
            if chosen[row] is None:
                hits = candidates[high == want_high[row]]
                if len(hits):
                    chosen[row] = hits[0]
        if all(c is not None for c in chosen):
            return torch.stack(chosen)
    raise ValueError(f"the backbone's timesteps almost never fall on the {favoured!r} side of {boundary}; "
                     f"choose another boundary")
