"""The region-instruction K/V cache: attention processors that store image-stream keys/values on full passes and
attend from the edited tokens only against them on edited-only passes (regione-spec §6–§7).

One core (``cached_attention``) serves every family; three thin processors compute the family's projections, norms
and rotary embedding exactly as the stock diffusers processor does and hand the joint ``[text; image]`` query, key
and value to it:

* ``AccelFluxProcessor``: FLUX.1 double- and single-stream blocks (``FluxAttnProcessor``) and FLUX.2 double-stream
  blocks (``Flux2AttnProcessor``);
* ``AccelFlux2SingleProcessor``: FLUX.2 single-stream blocks (``Flux2ParallelSelfAttnProcessor``, fused QKV+MLP);
* ``AccelQwenProcessor``: Qwen-Image double-stream blocks (``QwenDoubleStreamAttnProcessor2_0``).

Each wraps the processor installed before it (the stock one or a region-attention wrapper) and calls it unchanged
unless the transformer pass carries an ``accel`` attention kwarg (an ``AccelCall``): ``"store"`` runs the same math
and keeps the image rows of K and V (after QK-norm and rotary embedding, which act per token, so frozen rows are
equal to RegionE's recomputed ones); ``"cached"`` runs on ``[text; edited tokens]``, writes their fresh K/V rows into
the cache and attends to the full cached keys. Caches are keyed by layer and CFG branch (the call index in the step)
and live in the edit's ``KVStore``, never in the processors. A region-attention mask (the ``region`` kwarg of
``replan.attention``'s ``RegionProcessors``, an additive ``(1, 1, L, L)`` tensor) reaches an edited-only pass
restricted to the query rows that run (text + edited image rows) against the full keys: the runtime restricts it
once per pass (``restrict_region``), not once per layer.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from replan.attention.joint import qwen_joint_out, qwen_joint_qkv

STORE, CACHED = "store", "cached"


@dataclass(frozen=True, eq=False)
class AccelCall:
    """What one accelerated transformer pass hands every attention processor (the ``accel`` attention kwarg).

    ``mode``: ``"store"`` or ``"cached"``; ``ids``: the edited noisy-token indices (cached passes), on the device;
    ``branch``: the transformer call's index in its step (the CFG branch); ``text_len``: text tokens at the front of
    a single-stream block's joint sequence; ``store``: the edit's ``KVStore``."""

    mode: str
    store: KVStore
    branch: int = 0
    ids: torch.Tensor | None = None
    text_len: int | None = None


class KVStore:
    """Keys and values of the joint sequence per (layer, CFG branch) for one edit."""

    def __init__(self):
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.peak = 0  # the most bytes held at once

    def put(self, attn, branch: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.entries[(id(attn), branch)] = (key, value)
        self.peak = max(self.peak, self.nbytes)

    def get(self, attn, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.entries.get((id(attn), branch))
        if entry is None:
            raise RuntimeError(f"no stored K/V for CFG branch {branch} of this layer: an edited-only pass needs a "
                               "full store pass first (the partition step)")
        return entry

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()
        self.peak = 0


def cached_attention(attn, query, key, value, text_len: int, call: AccelCall, mask, backend, parallel_config):
    """Attention of the joint ``[text; image]`` sequence (``(B, S, H, D)`` after norm and rotary embedding) with the
    K/V cache: ``store`` keeps the whole sequence's keys and values; ``cached`` writes the fresh text rows and the
    fresh image rows at ``call.ids`` into them (in place, no copy of the cache) and attends to all of it. ``mask``:
    None, a bool/additive mask over the full key length, or a region mask ``(…, L, L)`` whose rows are restricted
    here."""
    if call.mode == STORE:
        call.store.put(attn, call.branch, key.clone(), value.clone())
    elif call.mode == CACHED:
        cache_k, cache_v = call.store.get(attn, call.branch)
        ids = call.ids
        rows = torch.cat([torch.arange(text_len, device=ids.device), ids + text_len])
        cache_k.index_copy_(1, rows, key.to(cache_k.dtype))
        cache_v.index_copy_(1, rows, value.to(cache_v.dtype))
        key, value = cache_k, cache_v
        if mask is not None and mask.ndim == 4 and mask.shape[-2] not in (1, query.shape[1]):
            mask = restrict_rows(mask, rows)  # a full region mask not restricted by the runtime
    else:
        raise ValueError(f"unknown K/V cache mode {call.mode!r}")
    return dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend, parallel_config=parallel_config)


def restrict_rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The query rows ``rows`` of a ``(…, L, L)`` mask against all ``L`` keys. The rows keep the row pitch of
    ``mask`` (a region mask's rows are 8-aligned in memory so SDPA takes it without a copy)."""
    length = mask.shape[-1]
    pitch = max(mask.stride(-2), length) if mask.stride(-1) == 1 else length
    out = mask.new_empty(*mask.shape[:-2], rows.numel(), pitch)[..., :length]
    return torch.index_select(mask, -2, rows.to(mask.device), out=out)


def restrict_region(region, rows: torch.Tensor):
    """``region`` (the ``region`` attention kwarg, a dense ``RegionCall``) with its mask restricted to the query
    rows ``rows`` (text rows, then the edited image rows) of an edited-only pass; the keys stay full."""
    if getattr(region, "kind", "dense") != "dense":
        raise ValueError(f"edited-only passes restrict a dense region mask; got a {region.kind!r} mask: use "
                         "attention dense")
    return dataclasses.replace(region, mask=restrict_rows(region.mask, rows))


class AccelWrapper:
    """Holds the processor installed before it; ``_attention_backend``/``_parallel_config`` read and write through
    to it, so diffusers' backend and context-parallel settings still reach the stock processor."""

    def __init__(self, inner):
        self.inner = inner
        self.inner_takes_region = "region" in inspect.signature(inner.__call__).parameters

    @property
    def _attention_backend(self):
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.inner._parallel_config = value

    def _delegate(self, *args, region=None):
        if self.inner_takes_region:
            return self.inner(*args, region=region)
        if region is not None:
            raise RuntimeError(f"{type(self.inner).__name__} cannot take a region mask")
        return self.inner(*args)

    def _mask_and_backend(self, region, attention_mask):
        """The mask for this pass and the attention backend that takes it."""
        if region is None:
            return attention_mask, self._attention_backend
        if getattr(region, "kind", "dense") == "flex":
            return region.mask, "flex"
        return region.mask, self._attention_backend


def _check_unfused(attn) -> None:
    if getattr(attn, "fused_projections", False):
        raise RuntimeError("region acceleration needs unfused Q/K/V projections: call "
                           "transformer.unfuse_qkv_projections() first")


class AccelFluxProcessor(AccelWrapper):
    """FLUX.1 double/single-stream and FLUX.2 double-stream attention with the K/V cache (stock math otherwise)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 region=None, accel: AccelCall | None = None):
        if accel is None:
            return self._delegate(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                  region=region)
        _check_unfused(attn)
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([attn.norm_added_q(eq), query], dim=1)
            key = torch.cat([attn.norm_added_k(ek), key], dim=1)
            value = torch.cat([ev, value], dim=1)
        else:
            text_len = int(accel.text_len or 0)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask, backend = self._mask_and_backend(region, attention_mask)
        out = cached_attention(attn, query, key, value, text_len, accel, mask, backend, self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
            return image, attn.to_add_out(text.contiguous())
        if getattr(attn, "pre_only", False):  # FLUX.1 single-stream: the block projects
            return out
        return attn.to_out[1](attn.to_out[0](out))


class AccelFlux2SingleProcessor(AccelWrapper):
    """FLUX.2 single-stream attention (fused QKV + MLP projection) with the K/V cache."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, region=None,
                 accel: AccelCall | None = None):
        if accel is None:
            return self._delegate(attn, hidden_states, attention_mask, image_rotary_emb, region=region)
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask, backend = self._mask_and_backend(region, attention_mask)
        out = cached_attention(attn, query, key, value, int(accel.text_len or 0), accel, mask, backend,
                               self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class AccelQwenProcessor(AccelWrapper):
    """Qwen-Image double-stream attention with the K/V cache. On edited-only passes the transformer still builds the
    rotary table of the whole image stream; the rows of the edited tokens are taken from it here."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, region=None, accel: AccelCall | None = None):
        if accel is None:
            return self._delegate(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                  attention_mask, image_rotary_emb, region=region)
        text_len = encoder_hidden_states.shape[1]
        q, k, v = qwen_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                 accel.ids if accel.mode == CACHED else None)
        mask, backend = self._mask_and_backend(region, attention_mask)
        if region is None and encoder_hidden_states_mask is not None:  # the stock joint padding mask, full keys
            image_len = hidden_states.shape[1]
            if accel.mode == CACHED:
                image_len = accel.store.get(attn, accel.branch)[0].shape[1] - text_len
            keep = torch.ones(hidden_states.shape[0], image_len, dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, keep], dim=1)[:, None, None, :]
        out = cached_attention(attn, q, k, v, text_len, accel, mask, backend, self._parallel_config)
        return qwen_joint_out(attn, out, text_len, q.dtype)


def accel_processor(processor, attention_module):
    """The K/V-cache wrapper for a processor of ``attention_module`` (by the module's class), or None when the
    module is not one of the supported families."""
    name = type(attention_module).__name__
    if name in ("FluxAttention", "Flux2Attention"):
        return AccelFluxProcessor(processor)
    if name == "Flux2ParallelSelfAttention":
        return AccelFlux2SingleProcessor(processor)
    if name == "Attention" and hasattr(attention_module, "add_q_proj"):  # Qwen-Image joint attention
        return AccelQwenProcessor(processor)
    return None


def wrap_processors(transformer) -> dict:
    """Wrap every attention processor of ``transformer`` in its K/V-cache processor; returns the previous ones.
    ``ValueError`` when a module is not one of the supported families."""
    original = dict(transformer.attn_processors)
    wrapped = {}
    for name, processor in original.items():
        module = transformer.get_submodule(name.removesuffix(".processor"))
        accel = accel_processor(processor, module)
        if accel is None:
            raise ValueError(f"region acceleration does not support {type(module).__name__} ({name}) of "
                             f"{type(transformer).__name__}")
        wrapped[name] = accel
    transformer.set_attn_processor(wrapped)
    return original

