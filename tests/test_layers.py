"""The package's layers and which way their imports point (docs/architecture.md, "Layers").

Every import between edgeproxy's subpackages, type-only ones included, must point down this
list; so the engine never imports a filter, routing never the engine, and so on. A new
module in a new place must be given a layer here, on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edgeproxy

PACKAGE = Path(edgeproxy.__file__).parent
# Bottom first: a module may import from its own layer and the ones above it in this list.
LAYERS = ["proto", "config", "telemetry", "net", "routing", "engine", "filters", "ops", "demo", "cli"]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "edgeproxy"


def _imports(path: Path, module: str) -> list[str]:
    """The edgeproxy modules ``path`` imports (absolute names), type-only imports included."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("edgeproxy"):
                found += [f"{target}.{a.name}" if not node.module else target for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("edgeproxy")]
    return found


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        layer = _layer(module)
        if layer in ("edgeproxy", "__main__"):
            continue
        assert layer in LAYERS, f"{module}: give its layer a place in LAYERS"
        for target in _imports(path, module):
            other = _layer(target)
            if other in ("edgeproxy", "__version__") or other == layer:
                continue
            if LAYERS.index(other) > LAYERS.index(layer):
                wrong.append(f"{module} imports {target} ({layer} -> {other}, upwards)")
    assert not wrong, "\n".join(wrong)


def test_the_engine_imports_no_filter() -> None:
    engine = PACKAGE / "engine"
    for path in engine.glob("*.py"):
        module = f"edgeproxy.engine.{path.stem}" if path.stem != "__init__" else "edgeproxy.engine"
        assert not [t for t in _imports(path, module) if t.startswith("edgeproxy.filters")], module
