"""BiCo's binders as plain modules and functions of tensors.

A binder is a residual MLP on prompt-token features that starts as the identity:
    f(x) = scale * LN(Linear(GELU(Linear(LN(x)))))      scale: a learned scalar, initialised to 0
so `x + f(x)` equals `x` exactly until training moves `scale`.

Hierarchy (per cross-attention site b, on the context after the backbone's own text projection):
    ctx_g = where(mask, ctx + f_g(ctx), ctx)           the global binder, the same for every site
    ctx_b = where(mask, ctx_g + f_b(ctx_g), ctx_g)     site b's own binder, on the globally bound
                                                       context (not cumulative over sites)
`where` (not `* mask`) keeps every unmasked position bit-identical, whatever the binder computes.

Temporal disentanglement (video concepts) uses dual-branch binders; stage 1 (frames) trains the
spatial branch alone, stage 2 (whole clips) the mix:
    f(x) = g(x) * spatial(x) + (1 - g(x)) * motion(x),  g = gate(LN(x) -> Linear(d, 1), bias 2)
`gate_values` gives g for the two gate kinds (see README.md: the official code's gate is always 1).

Precision: each binder computes in its own parameters' dtype (float32, or bfloat16 with
`method.binder_dtype=bfloat16`), but the residual stream `ctx + f(ctx)` is carried in the wider of the
context's and the binders' dtypes. So a float32 context with bf16 binders stays float32 where nothing
is added (at scale 0 the result is the context, bit for bit), and a bf16 context with float32
binders is bound in float32 and rounded once, at the end.
"""

from __future__ import annotations

import torch
from torch import nn

GATES = ("sigmoid", "code")
GATE_BIAS = 2.0  # official code


class Binder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim),
                                 nn.LayerNorm(dim))
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def gate_values(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """logits (..., 1) -> the spatial branch's weight g in [0, 1].

    sigmoid: sigma(logits); at the bias alone (2) that is sigma(2) = 0.8808.
    code:    softmax over the size-1 last axis, as the official code computes it: exactly 1 for every
             input, so the motion branch never contributes and never receives a gradient."""
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "code":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"gate must be one of {', '.join(GATES)}, got {kind!r}")


class DualBranchBinder(nn.Module):
    """Spatial + motion branches mixed per token by a gate. At the start of stage 2 the motion branch
    becomes a copy of the trained spatial branch (`restart_motion`), so the stage starts where stage 1
    ended (g * s + (1 - g) * s = s, up to float rounding), whatever the gate.

    The gate's Linear keeps PyTorch's default (random, seeded by the caller) weight, as in the
    official code, with bias 2: g differs from token to token, which is what lets the two identical
    branches drift apart. With one g for every token (a zero gate weight) both branches' gradients
    are proportional, Adam's normalised steps are then equal, and the branches would stay copies of
    each other (only Adam's epsilon breaks the tie)."""

    def __init__(self, spatial: Binder, gate: str = "sigmoid"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
        width = spatial.net[0].normalized_shape[0]
        self.kind = gate
        self.spatial = spatial
        self.motion = Binder(width)
        self.motion.load_state_dict(spatial.state_dict())
        self.gate_norm = nn.LayerNorm(width)
        self.gate = nn.Linear(width, 1)
        nn.init.constant_(self.gate.bias, GATE_BIAS)

    def restart_motion(self) -> None:
        """motion <- spatial, in place: the start of stage 2 (the spatial branch holds the stage-1
        binder), so the dual binder computes what the stage-1 binder computed."""
        with torch.no_grad():
            for mine, theirs in zip(self.motion.parameters(), self.spatial.parameters()):
                mine.copy_(theirs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = gate_values(self.gate(self.gate_norm(x)), self.kind)
        return g * self.spatial(x) + (1 - g) * self.motion(x)


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a binder holds and computes in (all its parameters share it)."""
    return next(module.parameters()).dtype


def residual_dtype(context: torch.Tensor, global_binder: nn.Module) -> torch.dtype:
    """The dtype `ctx + f(ctx)` is carried in: the wider of the context's and the binders'."""
    return torch.promote_types(context.dtype, parameter_dtype(global_binder))


def add_where(x: torch.Tensor, mask: torch.Tensor, binder: nn.Module) -> torch.Tensor:
    """where(mask, x + f(x), x): f computes in its own dtype, the sum stays in x's dtype."""
    delta = binder(x.to(parameter_dtype(binder))).to(x.dtype)
    return torch.where(mask.to(x.device).unsqueeze(-1), x + delta, x)


def bind_global(context: torch.Tensor, mask: torch.Tensor, global_binder: nn.Module) -> torch.Tensor:
    """ctx_g = where(mask, ctx + f_g(ctx), ctx), in the residual dtype (what every site's binder takes)."""
    return add_where(context.to(residual_dtype(context, global_binder)), mask, global_binder)


def bind_block(bound: torch.Tensor, mask: torch.Tensor, block_binder: nn.Module) -> torch.Tensor:
    """ctx_b = where(mask, ctx_g + f_b(ctx_g), ctx_g): one site's binder on the globally bound context."""
    return add_where(bound, mask, block_binder)


def bind(context: torch.Tensor, mask: torch.Tensor, global_binder: nn.Module, block_binder: nn.Module | None) -> torch.Tensor:
    """context (B, L, d) in any dtype; mask (B, L) bool. The whole hierarchy at one site, uncached (BiCo
    computes `bind_global` once per forward and `bind_block` per site); the result returns in the
    context's dtype."""
    bound = bind_global(context, mask, global_binder)
    if block_binder is not None:
        bound = bind_block(bound, mask, block_binder)
    return bound.to(context.dtype)


def write_absorbent(context: torch.Tensor, eos_index: torch.Tensor, absorbent: torch.Tensor) -> torch.Tensor:
    """The absorbent token in each row's EOS slot (training only): the row's EOS feature is replaced."""
    batch, length, _ = context.shape
    eos = torch.zeros(batch, length, dtype=torch.bool, device=context.device)
    eos[torch.arange(batch, device=context.device), eos_index.to(context.device)] = True
    filled = absorbent.to(device=context.device, dtype=torch.float32).expand(batch, length, -1)
    return torch.where(eos.unsqueeze(-1), filled, context.float()).to(context.dtype)


class SiteBinderHook:
    """The `context` hook BiCo adds on one cross-attention site: the owning concept decides the
    positions and runs the binders (the hook only says which site's binder applies)."""

    def __init__(self, concept, binder_index: int):
        self.concept = concept
        self.binder_index = binder_index

    def context(self, site, encoder_hidden_states):
        return self.concept.bind_context(encoder_hidden_states, self.binder_index)
