"""The house reads one way: app, CLI, training and evaluation use the service; the service uses the
pure model; the model uses its components. No import climbs back up (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Each layer may import only from itself and the layers below it.
LAYERS = [
    ("base", {"kanoclip.errors", "kanoclip.fileio", "kanoclip.cache", "kanoclip.config", "kanoclip.hub",
              "kanoclip.images", "kanoclip.precision", "kanoclip.knowledge.classes"}),
    ("model", {"kanoclip.modeling"}),
    ("service", {"kanoclip.backbone", "kanoclip.checkpoint", "kanoclip.detection", "kanoclip.references",
                 "kanoclip.knowledge", "kanoclip.detector", "kanoclip.viz", "kanoclip.viz_prompts", "kanoclip.data",
                 "kanoclip.onnx", "kanoclip.distributed", "kanoclip"}),
    ("uses", {"kanoclip.training", "kanoclip.evaluation", "kanoclip.video", "kanoclip.serving"}),
    ("entry", {"kanoclip.cli", "kanoclip.__main__", "demo"}),
]  # fmt: skip


def layer_of(module: str) -> int:
    """The layer of a dotted module name (the longest matching package wins)."""
    best, depth = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    assert best is not None, module
    return best


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "kanoclip" or name.startswith(("kanoclip.", "demo"))}


def test_no_import_climbs_back_up():
    climbing = []
    for path in sorted([*(REPO / "kanoclip").rglob("*.py"), *(REPO / "demo").rglob("*.py")]):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if module == "kanoclip":  # the package's lazy public names point at the service
            continue
        own = layer_of(module)
        for name in imports(path):
            if layer_of(name) > own:
                climbing.append(f"{module} ({LAYERS[own][0]}) imports {name} ({LAYERS[layer_of(name)][0]})")
    assert not climbing, "\n".join(climbing)


def test_the_check_sees_a_climbing_import():
    assert (
        layer_of("kanoclip.modeling.model")
        < layer_of("kanoclip.detector")
        < layer_of("kanoclip.training.trainer")
        < layer_of("demo.app")
    )
