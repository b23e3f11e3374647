"""The import graph of DESIGN.md, read from the source with ``ast`` (nothing is imported): replan's modules import one
way, bottom to top, and no private name (``_x``) is imported from another package.

    coords, images, io  →  plan, parse, clients  →  attention, accel  →  backbones  →  planner  →  pipeline
                                                                 →  infer, app, serve, eval, train, regions

A unit is a top-level module (``replan/coords.py``) or package (``replan/backbones/``). Every import statement counts,
also one inside a function. Units DESIGN does not name sit where their imports put them (docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "replan"

LAYERS = (
    # conversions, images, output writing, and helpers with no replan import
    ("coords", "images", "io", "config_io", "hub", "distributed", "qwen_processor"),
    # plans and their text forms, endpoint clients, user-input checks, prompt/rubric files; "" is replan/__init__.py
    ("plan", "region_masks", "overlay", "parse", "parse_official", "clients", "inputs", "templates", ""),
    ("attention", "accel"),
    ("backbones",),
    ("planner",),
    ("pipeline",),
    ("infer", "app", "serve", "eval", "train", "regions", "testing"),
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ("replan", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """``replan.backbones.registry`` → ``backbones``; ``replan`` → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path, root: Path = ROOT):
    """``(line, imported module, names)`` for every import of a replan module in the file; ``names`` are those of a
    ``from … import …`` (a relative import is resolved against the file's package)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "replan" or alias.name.startswith("replan."):
                    yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "replan" or target.startswith("replan."):
                yield node.lineno, target, tuple(alias.name for alias in node.names)


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def violations(paths, root: Path = ROOT) -> tuple[list[str], list[str], list[str]]:
    """(units missing from LAYERS, arrows back, private names imported across units), one line each."""
    unplaced, back, private = set(), [], []
    for path in paths:
        here = unit(module_name(path, root))
        if here not in LAYER:
            unplaced.add(f"replan/{here}")
            continue
        where = f"{path.relative_to(root.parent)}:"
        for line, target, names in imports(path, root):
            there = unit(target)
            if there not in LAYER:
                unplaced.add(f"replan/{there}")
                continue
            if LAYER[there] > LAYER[here]:
                back.append(f"{where}{line} imports {target} ({there}, layer {LAYER[there]}) from {here or 'replan'} "
                            f"(layer {LAYER[here]})")
            if there != here:
                # a module's own names are reached through the package's __init__ only if public
                hidden = [n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
                if hidden or (target.split(".")[-1].startswith("_") and target.split(".")[-1] != "__init__"):
                    private.append(f"{where}{line} imports {', '.join(hidden) or target} from {target}")
    return sorted(unplaced), back, private


def test_every_unit_has_a_layer():
    unplaced, _, _ = violations(sources())
    assert not unplaced, (f"{', '.join(unplaced)}: not in the layers of tests/test_import_graph.py; add it there and "
                          "to the import graph in docs/architecture.md")


def test_imports_run_one_way():
    _, back, _ = violations(sources())
    assert not back, "imports that run against the layers:\n" + "\n".join(back)


def test_no_private_name_crosses_a_package():
    _, _, private = violations(sources())
    assert not private, ("private names imported from another package (make them public in a module both may "
                         "import):\n" + "\n".join(private))


def test_every_package_names_its_public_api():
    def names_api(init: Path) -> bool:
        for node in ast.parse(init.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                return True
        return False

    missing = [str(p.relative_to(ROOT.parent)) for p in sorted(ROOT.rglob("__init__.py")) if not names_api(p)]
    assert not missing, f"packages whose __init__.py has no __all__: {', '.join(missing)}"


@pytest.mark.parametrize(("source", "message"), [
    ("from replan.pipeline import RePlanPipeline\n", "imports replan.pipeline (pipeline, layer 5) from backbones"),
    ("def f():\n    from replan.planner.base import Planner\n", "imports replan.planner.base (planner, layer 4)"),
    ("from replan.eval.judges import _helper\n", "imports _helper from replan.eval.judges"),
    ("from ..planner import qwen_vl\n", "imports replan.planner (planner, layer 4)"),
])
def test_the_check_catches_an_arrow_back_and_a_private_name(tmp_path, source, message):
    """The rules bite: a fake backbones module that imports upward or reaches for a private name."""
    fake = tmp_path / "replan" / "backbones" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    _, back, private = violations([fake], tmp_path / "replan")
    assert any(message in line for line in back + private), back + private
    same_layer = tmp_path / "replan" / "backbones" / "fine.py"
    same_layer.write_text("from replan.attention.rules import RuleSet\nfrom replan.backbones.base import _x\n")
    assert violations([same_layer], tmp_path / "replan") == ([], [], [])
