"""Region acceleration on a stock diffusers pipeline: a transformer hook, K/V-cache processors and a step callback.

    runtime = AccelRuntime.install(pipe.transformer)   # once per transformer; inactive, it is the stock one
    with runtime.activate(controller, pipe.scheduler): # one edit
        pipe(..., callback_on_step_end=runtime.callback)

Nothing else is changed: no copied denoising loop, no class swap, no module-level state (two pipelines in one
process each have their own runtime; two editors over one transformer share its runtime). The pieces:

* a diffusers ``ModelHook`` on the transformer (``new_forward``) hands every transformer call to the active
  ``RegionController``; the controller calls back ``run(ids, kv)``, which runs the real forward either unchanged
  (full passes), or on the edited noisy tokens only — their rows of ``hidden_states`` and, for the FLUX families, of
  ``img_ids`` (Qwen-Image builds its rotary table from ``img_shapes``; the processors take its rows) — with an
  ``accel`` attention kwarg telling the processors to store or use the K/V cache;
* the K/V-cache processors of ``replan.accel.kv``, wrapped around whatever processors are installed — the stock
  ones or region attention's (``RegionProcessors``, which every editor installs first). Region attention's
  transformer pre-hook runs before this hook, sees the full sequence and adds its ``region`` kwarg; edited-only
  passes get that mask restricted to their query rows (once per pass);
* for Qwen-Image-Edit-2511 (``zero_cond_t``) a forward pre-hook per block takes the edited rows of the per-token
  ``modulate_index`` on edited-only passes;
* ``callback`` (``callback_on_step_end``): the controller's partition and background pinning.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from replan.accel.controller import RegionController
from replan.accel.kv import AccelCall, AccelWrapper, KVStore, restrict_region, wrap_processors

HOOK_NAME = "replan_region_accel"


class _TransformerHook(ModelHook):
    def __init__(self, runtime: AccelRuntime):
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module, *args, **kwargs):
        if self.runtime.controller is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.runtime.forward(self.fn_ref.original_forward, args, kwargs)


class AccelRuntime:
    """Region acceleration installed on a transformer (persistent; inactive until ``activate``). Use ``install``."""

    def __init__(self, transformer):
        self.transformer = transformer
        params = inspect.signature(transformer.forward).parameters
        self.signature = inspect.signature(transformer.forward)
        self.kwarg = "joint_attention_kwargs" if "joint_attention_kwargs" in params else "attention_kwargs"
        self.ids_kwarg = "img_ids" if "img_ids" in params else None
        self.original = wrap_processors(transformer)
        self.hook = _TransformerHook(self)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(self.hook, HOOK_NAME)
        self.block_hooks = []
        if getattr(transformer, "zero_cond_t", False):
            for block in transformer.transformer_blocks:
                self.block_hooks.append(block.register_forward_pre_hook(self._gather_modulation, with_kwargs=True))
        self.controller: RegionController | None = None
        self.scheduler = None
        self.store = KVStore()
        self.ids: torch.Tensor | None = None  # edited rows of the pass in flight
        self._restriction: tuple | None = None  # (region call, edited ids, restricted call) of the last pass
        transformer._replan_accel_runtime = self

    @classmethod
    def install(cls, transformer) -> AccelRuntime:
        """The transformer's runtime: installed now, or the one already installed (a second editor over the same
        transformer shares it)."""
        existing = getattr(transformer, "_replan_accel_runtime", None)
        return existing if existing is not None else cls(transformer)

    # ------------------------------------------------------------------------------------------------ activation
    @contextmanager
    def activate(self, controller: RegionController, scheduler):
        """Run one edit with ``controller``; ``scheduler`` is the pipeline's (its sigmas fix the step plan). The K/V
        cache is freed afterwards."""
        if self.controller is not None:
            raise RuntimeError("another accelerated edit is running on this transformer")
        if not all(isinstance(p, AccelWrapper) for p in self.transformer.attn_processors.values()):
            raise RuntimeError("the transformer's attention processors were replaced after region acceleration was "
                               "installed (install region processors first, then AccelRuntime.install)")
        self.controller, self.scheduler = controller, scheduler
        try:
            yield self
        finally:
            self.controller = self.scheduler = None
            self.store.clear()
            self.ids = self._restriction = None

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: the controller's partition and pinning on the step's latents."""
        if self.controller is not None and "latents" in callback_kwargs:
            callback_kwargs["latents"] = self.controller.end_step(step, callback_kwargs["latents"])
        return callback_kwargs

    def remove(self) -> None:
        """Restore the processors installed before and remove the hooks."""
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(HOOK_NAME, recurse=False)
        for handle in self.block_hooks:
            handle.remove()
        self.transformer.set_attn_processor(self.original)
        self.transformer._replan_accel_runtime = None

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, original, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        hidden = bound["hidden_states"]
        controller = self.controller
        tokens = controller.tokens
        if controller.plan is None:
            controller.start(self.scheduler.sigmas)
        noise = hidden[:, :tokens]
        reference = hidden[:, tokens: 2 * tokens] if hidden.shape[1] >= 2 * tokens else None
        text = bound.get("encoder_hidden_states")
        text_len = 0 if text is None else text.shape[1]

        def run(ids: torch.Tensor | None, kv: str) -> torch.Tensor:
            call = dict(bound)
            if ids is not None:
                call["hidden_states"] = hidden.index_select(1, ids)
                if self.ids_kwarg and call.get(self.ids_kwarg) is not None:
                    img_ids = call[self.ids_kwarg]
                    call[self.ids_kwarg] = img_ids.index_select(img_ids.ndim - 2, ids.to(img_ids.device))
            if kv != "normal":
                accel = AccelCall(kv, self.store, branch=controller.branch, ids=ids, text_len=text_len)
                attention_kwargs = {**(call.get(self.kwarg) or {}), "accel": accel}
                if ids is not None and attention_kwargs.get("region") is not None:
                    attention_kwargs["region"] = self._restricted(attention_kwargs["region"], ids, text_len)
                call[self.kwarg] = attention_kwargs
            self.ids = ids
            try:
                out = original(**call)
            finally:
                self.ids = None
            return out[0] if isinstance(out, tuple) else out.sample

        velocity = controller.forward(noise, reference, run)
        if bound.get("return_dict", True):
            return Transformer2DModelOutput(sample=velocity)
        return (velocity,)

    def _restricted(self, region, ids: torch.Tensor, text_len: int):
        """The region mask of an edited-only pass: its text and edited query rows against every key, built once per
        (mask, edited set) — the partition changes the set at refresh steps, the rule switch changes the mask."""
        cached = self._restriction
        if cached is not None and cached[0] is region and cached[1] is ids:
            return cached[2]
        rows = torch.cat([torch.arange(text_len, device=ids.device), ids + text_len])
        restricted = restrict_region(region, rows)
        self._restriction = (region, ids, restricted)
        return restricted

    def _gather_modulation(self, module, args, kwargs):
        index = kwargs.get("modulate_index")
        if self.ids is None or index is None:
            return None
        return args, {**kwargs, "modulate_index": index.index_select(1, self.ids.to(index.device))}
