"""The KV-mixed cross-attention hook: an object's visual-prompt tokens get keys from one source and
values from another, through the method's own per-site projections.

At the token positions of an object's placeholder (see `slot_positions`), a cross-attention's keys
become `to_k_vp(key_tokens)` and its values `to_v_vp(value_tokens)`; every other position keeps the
frozen text keys and values. `to_k_vp` / `to_v_vp` are the method's own Linear layers per site,
initialised from the site's frozen to_k / to_v (as IP-Adapter initialises its to_k_ip / to_v_ip), so an
adapter's tokens start in the space the UNet's keys and values live in.
"""

from __future__ import annotations

import torch
from torch import nn


def site_key(name: str) -> str:
    return name.replace(".", "__")


def slot_positions(input_ids: torch.Tensor, first_id: int, slots: int) -> torch.Tensor:
    """(B, L) long: for each context position, which visual-prompt slot it holds (object j, token t
    -> j * tokens + t), or -1. The method's placeholders take `slots` consecutive reserved ids from
    `first_id` on (TokenTable registers one owner's placeholders together)."""
    offset = input_ids - first_id
    return torch.where((offset >= 0) & (offset < slots), offset, torch.full_like(offset, -1))


class VisualPromptProjections(nn.Module):
    """to_k_vp and to_v_vp per cross-attention site, initialised from the site's frozen projections."""

    def __init__(self, sites, denoiser=None):
        super().__init__()
        self.to_k = nn.ModuleDict()
        self.to_v = nn.ModuleDict()
        for site in sites:
            attention = denoiser.get_submodule(site.name) if denoiser is not None else None
            for store, frozen_name in ((self.to_k, "to_k"), (self.to_v, "to_v")):
                inner = attention.get_submodule(frozen_name).out_features if attention is not None else site.query_dim
                layer = nn.Linear(site.context_dim, inner, bias=False)
                if attention is not None:
                    with torch.no_grad():
                        layer.weight.copy_(attention.get_submodule(frozen_name).weight.float())
                store[site_key(site.name)] = layer


class VisualPromptKV:
    """A `key_value` hook (conceptkit.attention). `condition(key_tokens, value_tokens)` sets what the
    slots carry: (M * tokens, C) for every row alike, or (B, M * tokens, C) per row (training, where
    each row shows other objects); keys and values may differ in that (guidance refines values per
    render). With no condition, or rows without slots, it changes nothing."""

    def __init__(self, projections: VisualPromptProjections, hooks, first_id_fn, slots: int):
        self.projections = projections
        self.hooks = hooks  # the backbone's AttentionHooks: `rows` says which ids the context holds
        self.first_id_fn = first_id_fn  # -> the first reserved id now (ids shift when others unregister)
        self.slots = slots
        self.key_tokens: torch.Tensor | None = None
        self.value_tokens: torch.Tensor | None = None
        self._positions_for = None  # (rows object, first id) the cached positions belong to
        self._positions = None

    def condition(self, key_tokens: torch.Tensor | None, value_tokens: torch.Tensor | None) -> None:
        self.key_tokens, self.value_tokens = key_tokens, value_tokens

    def positions(self, device) -> torch.Tensor | None:
        rows = self.hooks.rows
        if rows is None:
            return None
        first = self.first_id_fn()
        if self._positions_for != (id(rows), first) or self._positions.device != device:
            self._positions = slot_positions(rows.input_ids, first, self.slots).to(device)
            self._positions_for = (id(rows), first)
        return self._positions

    def key_value(self, site, key, value):
        if self.key_tokens is None:
            return key, value
        positions = self.positions(key.device)
        if positions is None or positions.shape != key.shape[:2]:
            return key, value  # not the context this condition was declared for
        if bool((positions < 0).all()):
            return key, value
        name = site_key(site.name)
        keys = self.projections.to_k[name](self.key_tokens.to(self.projections.to_k[name].weight.dtype))
        values = self.projections.to_v[name](self.value_tokens.to(self.projections.to_v[name].weight.dtype))
        batch = key.shape[0]
        if keys.ndim == 2:
            keys = keys.expand(batch, -1, -1)
        if values.ndim == 2:
            values = values.expand(batch, -1, -1)
        index = positions.clamp_min(0)[..., None].expand(-1, -1, keys.shape[-1])
        inside = (positions >= 0)[..., None]
        key = torch.where(inside, keys.gather(1, index).to(key.dtype), key)
        value = torch.where(inside, values.gather(1, index).to(value.dtype), value)
        return key, value
