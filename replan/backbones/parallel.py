"""Context parallelism for a region editor: one edit computed by several GPUs with diffusers' Ulysses attention.

    from diffusers import ContextParallelConfig
    editor = load_editor("flux", device=init_distributed())            # under torchrun, on every rank
    enable_context_parallel(editor, ContextParallelConfig(ulysses_degree=2))
    editor.edit(image, plan, seed=0)                                     # every rank, the same arguments

What it does, in the order diffusers needs it: the region processors are already installed (the editor installs
them at construction, so ``enable_parallelism`` hands them the parallel config — a processor set later would
attend only within its own chunk); the device mesh is ``("group", "ring", "ulysses")`` so that a node can hold
several groups; ``transformer.enable_parallelism`` splits the sequence; the processors learn the Ulysses split, so
region masks are built in each rank's token order with the text padded to the split (``replan.attention.parallel``).

Compiling (``editor.compile()`` after this) works with plain Ulysses: whole graphs, the all-to-all inside them, one
graph per shape as without parallelism.

Refused with a clear message: Ring attention with regions (diffusers' ring hands one mask to every key/value chunk,
so a 2-D region mask cannot be carried), FlexAttention (diffusers registers no context-parallel flex backend),
tensor parallelism, compiling before parallelising, compiling with ``ulysses_anything`` (its all-to-all of unequal
chunks does not trace), head counts that do not divide without ``ulysses_anything``, and region acceleration
(``accel``: its edited-only passes are not composed with the split yet; ``check_accel_parallel``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from replan.attention import UlyssesSplit
from replan.distributed import EditGroup, group_mesh, is_initialized


def context_parallel_config(config):
    """The ``ContextParallelConfig`` inside ``config`` (a ``ContextParallelConfig`` or a ``ParallelConfig``)."""
    from diffusers import ContextParallelConfig, ParallelConfig

    if isinstance(config, ParallelConfig):
        if config.tensor_parallel_config is not None:
            raise ValueError("tensor parallelism is not supported by replan's region attention; use "
                             "ContextParallelConfig(ulysses_degree=N)")
        config = config.context_parallel_config
    if not isinstance(config, ContextParallelConfig):
        raise ValueError(f"parallel must be a diffusers ContextParallelConfig, got {type(config).__name__}")
    return config


def enable_context_parallel(editor, config) -> EditGroup:
    """Parallelise ``editor``'s transformer; returns this rank's ``EditGroup`` (then ``editor.group``).

    Collective: every rank of the world calls it, in the same order, with the same config."""
    config = context_parallel_config(config)
    if editor.parallel is not None:
        raise ValueError("this editor already runs with context parallelism")
    if editor.compiled:
        raise ValueError("enable context parallelism before compile(): the compiled blocks would not see the split")
    transformer = editor.pipe.transformer
    heads = int(transformer.config.num_attention_heads)
    ulysses, ring = config.ulysses_degree, config.ring_degree
    if ulysses > 1 and heads % ulysses and not config.ulysses_anything:
        raise ValueError(f"the transformer's {heads} attention heads do not split into Ulysses-{ulysses}: use a "
                         f"degree that divides {heads}, or ulysses_anything (--ulysses_anything)")
    if not is_initialized():
        raise ValueError("context parallelism needs torch.distributed: launch with 'torchrun --nproc_per_node N' "
                         "(or call replan.distributed.init_distributed() first)")
    if torch.accelerator.device_count() < 1:
        raise ValueError("context parallelism needs one accelerator (GPU) per rank and none is visible: diffusers "
                         "places rank r on device r % device_count")
    if config.mesh is None:
        config.mesh = group_mesh(editor.device.type, ring, ulysses)
    group = EditGroup.of_size(ring * ulysses)
    transformer.enable_parallelism(config=config)
    missing = [name for name, proc in transformer.attn_processors.items()
               if getattr(proc, "_parallel_config", None) is None]
    if missing:
        raise RuntimeError(f"{len(missing)} attention processor(s) did not receive the parallel config (e.g. "
                           f"{missing[0]}): they would attend within their own chunk only")
    if ring == 1:
        editor.processors.ulysses = UlyssesSplit(ulysses, bool(config.ulysses_anything))
    editor.processors.parallel, editor.processors.group = config, group  # shared by editors over this transformer
    return group


def check_parallel_compile(editor) -> None:
    """Refuse compiling what dynamo cannot trace under context parallelism (before anything is compiled)."""
    config = editor.parallel
    if config is not None and config.ulysses_anything:
        raise ValueError("ulysses_anything cannot be compiled (diffusers' all-to-all of unequal chunks does not "
                         "trace into a graph): drop --compile, or --ulysses_anything with a size that divides")


def accel_requested(accel) -> bool:
    """Whether ``accel`` asks for acceleration: a mode name other than "none", a mapping with such a ``mode``, or a
    config object whose ``enabled`` is true (None, "none" and a mapping without a mode do not: ``AccelConfig`` reads
    those as mode none)."""
    if accel is None:
        return False
    if isinstance(accel, str):
        return accel.strip().lower() not in ("", "none")
    if isinstance(accel, Mapping):
        return accel_requested(accel.get("mode") or "none")
    return bool(getattr(accel, "enabled", True))


def check_accel_parallel(accel, ulysses: int) -> None:
    """Refuse region acceleration (``--accel``) together with context parallelism (``--ulysses N``, N > 1), before
    any model loads: the composition is not built (docs/parallel.md)."""
    if ulysses > 1 and accel_requested(accel):
        mode = accel if isinstance(accel, str) else (accel.get("mode") if isinstance(accel, Mapping)
                                                     else getattr(accel, "mode", None))
        raise ValueError(f"acceleration (--accel {mode or '…'}) cannot run under context parallelism (--ulysses) "
                         "yet: RegionE's edited-only passes would need the K/V cache kept after the all-to-all, and "
                         "cache-dit's step cache is not tested across ranks; use --accel none or --ulysses 1")


def check_parallel_edit(editor, has_regions: bool, attention: str, accel=None) -> UlyssesSplit | None:
    """Refuse what context parallelism cannot carry, before any model work; returns the Ulysses split (or None)."""
    config = editor.parallel
    if config is None:
        return None
    check_accel_parallel(accel, config.ulysses_degree * config.ring_degree)
    if has_regions and config.ring_degree > 1:
        raise ValueError("Ring attention cannot carry a region mask (diffusers' ring hands the same mask to every "
                         "key/value chunk): use Ulysses (ContextParallelConfig(ulysses_degree=N), --ulysses N)")
    if has_regions and attention == "flex":
        raise ValueError("--attention flex cannot run under context parallelism (diffusers has no context-parallel "
                         "FlexAttention backend): use --attention dense")
    return editor.processors.ulysses
