"""Process groups for multi-GPU edits: join the group ``torchrun`` (or a spawning parent) describes, pick this rank's
device, split the ranks into groups that share one edit, and run a step (planning, reading input) on a group's
leader only.

    torchrun --nproc_per_node 2 -m replan.infer --ulysses 2 --image in.png --instruction "…"   # one group of 2
    torchrun --nproc_per_node 8 -m replan.eval.generate --config … ulysses=2                   # four groups of 2

A group is ``size`` consecutive ranks (ranks ``g·size … g·size+size-1`` form group g), the same split as the
``("group", "ring", "ulysses")`` device mesh that context parallelism uses. Its first rank is the leader: it plans,
writes outputs and answers requests; the others compute the edit with it.

Only torch is imported here; nothing touches a GPU at import.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GROUP_DIMS = ("group", "ring", "ulysses")


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(device=None, *, rank: int | None = None, world_size: int | None = None,
                     init_method: str | None = None) -> torch.device:
    """Join the default process group (once) and return this rank's device.

    Without arguments the group is the one ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); a parent that spawns its own ranks passes ``rank``, ``world_size`` and ``init_method``
    (``tcp://host:port``). The backend is NCCL on CUDA and gloo otherwise. ``device``: see ``rank_device``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: multi-GPU edits are not available")
    if not dist.is_initialized():
        if rank is None and "RANK" not in os.environ:
            raise ValueError("multi-GPU edits run one process per GPU: launch with "
                             "'torchrun --nproc_per_node N -m …' (RANK/WORLD_SIZE are not set)")
        target = _device_type(device)
        backend = "nccl" if target == "cuda" else "gloo"
        explicit = {} if rank is None else {"rank": rank, "world_size": world_size}
        dist.init_process_group(backend, init_method=init_method or "env://", **explicit)
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return rank_device(device)


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def rank_device(device=None) -> torch.device:
    """This rank's device: ``cuda`` (or None with CUDA present) becomes ``cuda:$LOCAL_RANK``, made current; an
    explicit index or another device type is kept."""
    kind = _device_type(device)
    if kind != "cuda":
        return torch.device(device if device is not None else "cpu")
    chosen = torch.device(device if device is not None else "cuda")
    if chosen.index is None:
        local = int(os.environ.get("LOCAL_RANK", _rank()))
        chosen = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    torch.cuda.set_device(chosen)
    return chosen


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def group_mesh(device_type: str, ring: int, ulysses: int):
    """The ``("group", "ring", "ulysses")`` device mesh: the world split into groups of ``ring × ulysses`` ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world, size = dist.get_world_size(), ring * ulysses
    if world % size:
        raise ValueError(f"{world} processes do not split into groups of {size} (ring {ring} × ulysses {ulysses}): "
                         f"launch a multiple of {size} processes")
    return init_device_mesh(device_type, (world // size, ring, ulysses), mesh_dim_names=GROUP_DIMS)


@dataclass
class EditGroup:
    """The ranks that run one edit together. ``EditGroup.single()`` is the one-process case: every method is then a
    plain local call."""

    rank: int = 0  # global rank
    world: int = 1
    size: int = 1  # ranks per group
    group: object = None  # the group's torch.distributed ProcessGroup (None for a single process)

    @classmethod
    def single(cls) -> EditGroup:
        return cls()

    @classmethod
    def of_size(cls, size: int) -> EditGroup:
        """This rank's group of ``size`` consecutive ranks (a collective call: every rank must make it)."""
        import torch.distributed as dist

        world = dist.get_world_size()
        if size < 1 or world % size:
            raise ValueError(f"{world} processes do not split into groups of {size}")
        group, _ = dist.new_subgroups(group_size=size)
        return cls(dist.get_rank(), world, size, group)

    @property
    def index(self) -> int:
        """Which group this rank is in (0 … count-1)."""
        return self.rank // self.size

    @property
    def count(self) -> int:
        return self.world // self.size

    @property
    def local(self) -> int:
        return self.rank % self.size

    @property
    def leader(self) -> bool:
        return self.local == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def broadcast(self, obj=None):
        """The leader's ``obj`` on every rank of the group (pickled)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def on_leader(self, fn, *args, **kwargs):
        """Run ``fn`` on the leader only and return its result on every rank; an exception it raises is raised on
        every rank (so no rank waits for a result that never comes)."""
        if not self.distributed:
            return fn(*args, **kwargs)
        outcome, original = None, None
        if self.leader:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except Exception as e:  # sent to the other ranks, then raised here too
                outcome, original = ("error", _portable(e)), e
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise original or value
        return value

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def _portable(e: Exception) -> Exception:
    """``e`` if it survives pickling, else a ``RuntimeError`` carrying its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a process group a parent sets up itself)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
