"""Context parallelism on the CPU, for tests and benchmarks only: several gloo processes on the tiny backbones.

diffusers' ``enable_parallelism`` places rank r on device ``r % torch.accelerator.device_count()``, which divides by
zero on a machine without an accelerator, and replan refuses context parallelism there for the same reason. On a
CPU-only machine ``allow_cpu()`` makes ``device_count`` report one device, which is all that stands between gloo and
a working Ulysses run on the CPU. Production code never imports this module.

    python -m replan.testing.parallel MODULE [ARGS…]      # ``python -m MODULE ARGS`` with the CPU patch
    launch(2, "replan.infer", ["--ulysses", "2", …])     # torchrun --nproc_per_node 2 of that, on this machine

Ranks that a parent process spawns itself (the edit server's followers) are started through this module as well.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import torch

from replan.distributed import free_port

MODULE = "replan.testing.parallel"  # (``__name__`` is "__main__" when this runs as a script)


def allow_cpu(followers: bool = True) -> None:
    """Let diffusers' context parallelism run on a machine without an accelerator (gloo on the CPU); with
    ``followers`` the edit server's follower ranks are started through this module too."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    if followers:
        import replan.serve.followers as module

        module.LAUNCHER = [sys.executable, "-m", MODULE]


def cpu_env(extra: dict | None = None) -> dict:
    """The environment for CPU ranks: one thread each (the ranks share the cores), offline hub."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "0"})
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


def launch(nproc: int, module: str, args=(), *, env: dict | None = None, timeout: float = 600,
           cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as ``nproc`` gloo ranks under torchrun on this machine (CPU patch applied)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", MODULE, module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cpu_env(env), cwd=cwd)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m replan.testing.parallel MODULE [ARGS…]")
    allow_cpu(followers=argv[0] != "replan.serve.followers")  # (a follower spawns nothing)
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
