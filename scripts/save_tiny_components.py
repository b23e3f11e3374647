"""Save the tiny random offline components replan tests with, to use them in your own tests or to inspect them.

    python scripts/save_tiny_components.py outputs/tiny      # writes outputs/tiny/{kontext,qwen25vl}

Each directory loads with the ordinary ``from_pretrained`` (``FluxKontextPipeline`` / ``QwenVLPlanner``).
Random weights: outputs are noise; shapes, tokenizers, configs and code paths are the real ones.
"""

import sys
from pathlib import Path

from replan.testing import save_tiny_kontext
from replan.testing.qwenvl import save_tiny_qwen25vl


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "outputs/tiny")
    for name, save in (("kontext", save_tiny_kontext), ("qwen25vl", save_tiny_qwen25vl)):
        print(save(root / name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
