"""conceptkit's attention processors: the one place methods plug into attention.

A backbone installs one processor per attention module, once, through diffusers'
`set_attn_processor`. Methods never replace processors; they add *hooks* by owner on the shared
`AttentionHooks` registry, so any number of concepts stack and removing one owner undoes exactly
its hooks. With no hooks, the processors compute what the stock diffusers processors compute, op for
op (tests/test_attention.py pins this bit for bit).

A hook is any object with some of these methods (all optional):
  - ``context(site, encoder_hidden_states) -> encoder_hidden_states``: edit the cross-attention context
  - ``key_value(site, key, value) -> (key, value)``: edit projected keys/values, shape (B, S, H*D)
  - ``probabilities(site, probs)``: observe softmax(QK^T) of shape (B, heads, Q, K); requesting it
    switches only that call to the explicit softmax path (SDPA exposes no probabilities)
  - ``logit_bias(site, batch, queries, keys) -> tensor | None``: an additive bias on the attention
    logits QK^T / sqrt(d), broadcastable to (B, heads, Q, K) (e.g. (B, 1, Q, K)); -inf where a query
    must not see a key (a visual prompt's tokens outside its region). Biases of several hooks add up
    and go to SDPA as its float `attn_mask`, so the fast path stays the fast path. A hook that must not
    act on some rows (the unconditional half of a guided batch) returns zeros there.
  Per-token keys/values from another source (a visual prompt's own projections) are a ``key_value``
  hook that writes them at its token positions (`AttentionHooks.rows` says where those are).
`CrossAttentionMaps` is such a hook (head-averaged maps of chosen tokens), and `maps_on_latent_grid`
lays its records out on the latent grid (MCPL's attention mask, compose's `attention_maps=true`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention module sits: what methods select hooks by."""

    name: str  # module path inside the denoiser, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    kind: str  # "self" or "cross"
    block_index: int  # index of the transformer block / UNet attention site in forward order
    query_dim: int
    context_dim: int
    heads: int
    token_axis: str  # "spatial" (SD: h*w tokens) or "spatiotemporal" (Wan: f*h*w tokens)


@dataclass(frozen=True)
class ContextRows:
    """What each row of the text context of the next denoiser calls was encoded from: its token ids
    (padding and EOS known) and whether it is the unconditional (negative) row of a guided batch.

    Context hooks that act on token positions (BiCo's binders) read it from `AttentionHooks.rows`;
    the context tensor itself carries no ids. `Backbone.encode_text` declares the rows it encoded,
    `Backbone.generate` declares the guided batch [negative rows | prompt rows]; a caller that feeds
    the denoiser another context declares its rows itself."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L): 1 for real tokens (incl. EOS), 0 for padding
    eos_index: torch.Tensor  # (B,)
    unconditional: torch.Tensor  # (B,) bool

    @classmethod
    def conditional(cls, tokenized) -> "ContextRows":
        return cls(tokenized.input_ids, tokenized.attention_mask, tokenized.eos_index,
                   torch.zeros(tokenized.input_ids.shape[0], dtype=torch.bool))

    @classmethod
    def guided(cls, negative, positive) -> "ContextRows":
        """The rows of a classifier-free-guidance batch: negative prompts first, then the prompts."""
        return cls(torch.cat([negative.input_ids, positive.input_ids]),
                   torch.cat([negative.attention_mask, positive.attention_mask]),
                   torch.cat([negative.eos_index, positive.eos_index]),
                   torch.cat([torch.ones(negative.input_ids.shape[0], dtype=torch.bool),
                              torch.zeros(positive.input_ids.shape[0], dtype=torch.bool)]))


class AttentionHooks:
    """Hooks keyed by owner; each hook applies to the sites its selector accepts."""

    def __init__(self) -> None:
        self._hooks: list[tuple[str, Any, Any]] = []  # (owner, selector(site) -> bool, hook)
        self.rows: ContextRows | None = None  # the rows of the context being denoised (see ContextRows)

    def declare_rows(self, rows: ContextRows | None) -> None:
        self.rows = rows

    def add(self, owner: str, hook: Any, selector=None) -> None:
        self._hooks.append((owner, selector or (lambda site: True), hook))

    def remove(self, owner: str) -> None:
        self._hooks = [h for h in self._hooks if h[0] != owner]

    def owners(self) -> list[str]:
        return sorted({h[0] for h in self._hooks})

    def for_site(self, site: AttentionSite) -> list[Any]:
        return [hook for _, selector, hook in self._hooks if selector(site)]


class CrossAttentionMaps:
    """A `probabilities` hook that keeps head-averaged cross-attention maps of chosen context columns.

    `columns` (B, K, n) weighs the K context positions into n maps per batch row: a one-hot column
    reads one token, several ones sum tokens, an all-zero row (e.g. the unconditional half of a
    guided batch) gives zero maps. Maps are detached: they say where a token looks, nothing trains
    through them. Only the sites this hook is added for leave the fast SDPA path.
    """

    def __init__(self, columns: torch.Tensor):
        self.columns = columns
        self.maps: list[tuple[AttentionSite, torch.Tensor]] = []  # (site, (B, Q, n)) per observed call

    def probabilities(self, site: AttentionSite, probs: torch.Tensor) -> None:
        columns = self.columns.to(device=probs.device, dtype=torch.float32)
        self.maps.append((site, probs.detach().float().mean(dim=1) @ columns))


def site_grid(site: AttentionSite, queries: int, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(frames, h, w) of a site's query grid for a (frames, height, width) latent: spatial sites (SD)
    hold one frame of h*w queries at their own resolution, spatiotemporal ones (Wan) frames*h*w."""
    grid_frames = frames if site.token_axis == "spatiotemporal" else 1
    per_frame = queries // grid_frames
    h = max(1, round(math.sqrt(per_frame * height / width)))
    w = per_frame // h
    if grid_frames * h * w != queries:
        raise ValueError(f"site {site.name}: {queries} queries do not tile a {height}x{width} latent")
    return grid_frames, h, w


class RegionLogitBias:
    """A `logit_bias` hook: queries outside a region may not attend to chosen key columns (logit -inf).

    `columns` (B, K) bool: the key positions it restricts per row (an object's visual-prompt tokens);
    `regions` (B, F, H, W) bool on the latent grid: where each row's restricted keys stay visible, laid
    onto every site's own token grid (nearest; SD: one frame of h*w queries, Wan: F*h*w). Rows whose
    columns are all False (the unconditional half of a guided batch) are untouched. Only restricted
    columns are blocked, so every query keeps the rest of the context and no softmax row is empty.
    One restriction per key column: for several objects, `columns` marks each object's tokens and
    `regions` is built per column with `column_regions` (B, K, F, H, W) instead.
    """

    def __init__(self, columns: torch.Tensor, regions: torch.Tensor):
        if regions.ndim == 4:  # one region per row, for all its restricted columns
            regions = regions[:, None].expand(-1, columns.shape[1], -1, -1, -1)
        if regions.ndim != 5 or regions.shape[:2] != columns.shape:
            raise ValueError(f"regions must be (B, F, H, W) or (B, K, F, H, W) for columns {tuple(columns.shape)}, "
                             f"got {tuple(regions.shape)}")
        self.columns = columns.bool()
        self.regions = regions.bool()

    def _on_site_grid(self, site: AttentionSite, queries: int) -> torch.Tensor:
        batch, keys, frames, height, width = self.regions.shape
        grid_frames, h, w = site_grid(site, queries, frames, height, width)
        regions = self.regions[:, :, :grid_frames].float().reshape(batch * keys, grid_frames, height, width)
        regions = F.interpolate(regions, size=(h, w), mode="nearest") > 0.5
        return regions.reshape(batch, keys, grid_frames * h * w).transpose(1, 2)  # (B, Q, K)

    def logit_bias(self, site: AttentionSite, batch: int, queries: int, keys: int):
        if (batch, keys) != tuple(self.columns.shape):
            return None  # another attention (self-attention, another context): not this hook's
        inside = self._on_site_grid(site, queries).to(self.columns.device)
        blocked = self.columns[:, None, :] & ~inside
        bias = torch.zeros(blocked.shape, dtype=torch.float32, device=blocked.device)
        return bias.masked_fill(blocked, float("-inf"))[:, None]  # (B, 1, Q, K)


def maps_on_latent_grid(maps: list[tuple[AttentionSite, torch.Tensor]], frames: int, height: int,
                        width: int) -> torch.Tensor:
    """Recorded maps (B, Q, n), each laid out on its site's token grid and resized (nearest) to the
    latent grid, averaged over sites and calls: (B, n, frames, height, width). Spatial sites (SD) hold
    one frame of h*w queries; spatiotemporal sites (Wan, temporal patch 1) hold frames*h*w."""
    if not maps:
        raise ValueError("no attention maps were recorded (no selected site ran)")
    total = None
    for site, recorded in maps:
        batch, queries, n = recorded.shape
        grid_frames, h, w = site_grid(site, queries, frames, height, width)
        grid = recorded.transpose(1, 2).reshape(batch * n, grid_frames, h, w)
        grid = F.interpolate(grid, size=(height, width), mode="nearest")
        grid = grid.reshape(batch, n, grid_frames, height, width).expand(batch, n, frames, height, width)
        total = grid if total is None else total + grid
    return total / len(maps)


def _with_logit_biases(attn_mask, query, key, site, hooks):
    """attn_mask plus every hook's logit bias, as one float mask (None when no hook adds one)."""
    biases = [b for h in hooks if hasattr(h, "logit_bias")
              for b in [h.logit_bias(site, query.shape[0], query.shape[2], key.shape[2])] if b is not None]
    if not biases:
        return attn_mask
    total = attn_mask
    if total is not None and total.dtype == torch.bool:
        total = torch.zeros(total.shape, dtype=query.dtype, device=query.device).masked_fill(~total, float("-inf"))
    for bias in biases:
        bias = bias.to(device=query.device, dtype=query.dtype)
        total = bias if total is None else total + bias
    return total


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask, site, hooks) -> torch.Tensor:
    """The shared attention math. q/k/v are (B, heads, S, D). Uses SDPA unless a hook needs the
    probabilities, in which case only this call takes the explicit softmax path."""
    attn_mask = _with_logit_biases(attn_mask, query, key, site, hooks)
    observers = [h for h in hooks if hasattr(h, "probabilities")]
    if not observers:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    scores = (query @ key.transpose(-1, -2)) * (query.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = scores.softmax(dim=-1)
    for hook in observers:
        hook.probabilities(site, probs)
    return probs.to(value.dtype) @ value


def _edit_context(site, hooks, encoder_hidden_states):
    for hook in hooks:
        if hasattr(hook, "context"):
            encoder_hidden_states = hook.context(site, encoder_hidden_states)
    return encoder_hidden_states


def _edit_key_value(site, hooks, key, value):
    for hook in hooks:
        if hasattr(hook, "key_value"):
            key, value = hook.key_value(site, key, value)
    return key, value


class UNetAttnProcessor:
    """For diffusers `Attention` (UNet2DConditionModel). Mirrors AttnProcessor2_0 step for step."""

    def __init__(self, site: AttentionSite, hooks: AttentionHooks):
        self.site = site
        self.hooks = hooks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        site_hooks = self.hooks.for_site(self.site)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if encoder_hidden_states is not None and site_hooks:
            encoder_hidden_states = _edit_context(self.site, site_hooks, encoder_hidden_states)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if site_hooks:
            key, value = _edit_key_value(self.site, site_hooks, key, value)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = attend(query, key, value, attention_mask, self.site, site_hooks)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _wan_rotary(hidden_states, freqs_cos, freqs_sin):
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanAttnProcessor:
    """For diffusers `WanAttention` (WanTransformer3DModel). Mirrors diffusers' WanAttnProcessor with
    the native SDPA backend. Image-conditioned (I2V) attention takes an explicit `image_context_length`
    instead of diffusers' `len - 512` guess, which is wrong for longer contexts (REFERENCE.md), and may
    take the backbone's `key_padding` (a logit_bias hook masking padded text rows of the context, see
    backbones/video_condition.py), which only the text attention sees."""

    def __init__(self, site: AttentionSite, hooks: AttentionHooks, image_context_length: int | None = None,
                 key_padding=None):
        self.site = site
        self.hooks = hooks
        self.image_context_length = image_context_length
        self.key_padding = key_padding

    @staticmethod
    def _heads_first(x, heads):
        return x.unflatten(2, (heads, -1)).permute(0, 2, 1, 3)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        site_hooks = self.hooks.for_site(self.site)
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            split = self.image_context_length
            if split is None:
                split = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :split]
            encoder_hidden_states = encoder_hidden_states[:, split:]
        if encoder_hidden_states is not None and site_hooks:
            encoder_hidden_states = _edit_context(self.site, site_hooks, encoder_hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.fused_projections:
            if not attn.is_cross_attention:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(context)
            value = attn.to_v(context)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if site_hooks:
            key, value = _edit_key_value(self.site, site_hooks, key, value)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        query, key, value = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
            else:
                key_img = attn.add_k_proj(encoder_hidden_states_img)
                value_img = attn.add_v_proj(encoder_hidden_states_img)
            key_img = self._heads_first(attn.norm_added_k(key_img), attn.heads)
            value_img = self._heads_first(value_img, attn.heads)
            hidden_states_img = attend(query, key_img, value_img, None, self.site, ())
            hidden_states_img = hidden_states_img.permute(0, 2, 1, 3).flatten(2, 3).type_as(query)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        text_hooks = site_hooks if self.key_padding is None else [*site_hooks, self.key_padding]
        hidden_states = attend(query, key, value, attention_mask, self.site, text_hooks)
        hidden_states = hidden_states.permute(0, 2, 1, 3).flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def word_map_sites(cross_sites) -> list[str]:
    """The cross-attention sites whose maps say where a word lands: MCPL's default mask sites, and
    the sites the word-attention diagnostics read (bench/).

    UNets (spatial sites): the grid one level finer than the coarsest, i.e. down_blocks.{L-2} and
    up_blocks.1 for an L-level UNet: on SD1.5 (L = 4) the 16x16 maps at 512 px, the official choice.
    L is the number of up blocks (the last, finest one always holds attention).
    DiTs (spatiotemporal sites, one grid): the blocks at 1/3, 1/2 and 2/3 of the depth (ours)."""
    if not cross_sites:
        return []
    if cross_sites[0].token_axis == "spatial":
        levels = 1 + max(int(s.name.split(".")[1]) for s in cross_sites if s.name.startswith("up_blocks."))
        prefixes = (f"down_blocks.{levels - 2}.", "up_blocks.1.")
        return [s.name for s in cross_sites if s.name.startswith(prefixes)]
    depth = 1 + max(s.block_index for s in cross_sites)
    chosen = {depth // 3, depth // 2, (2 * depth) // 3}
    return [s.name for s in cross_sites if s.block_index in chosen]
