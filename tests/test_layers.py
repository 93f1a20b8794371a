"""The layers point down: a module imports only its own layer and those below it, and no modules import
each other in a circle. The graph is read from the source (every `import` and `from ... import`, lazy
ones inside functions included), so a test run imports nothing to check it.

The order, lowest first: core (config, model, tokenizer, checkpoint, hf_format, loading, report) ← data ← inference ←
training ← finetune ← interop ← serve ← cli; the package's façade (gptlab/__init__.py, __main__.py) sits
on top. No import points up: a higher layer plugs into a lower one through an interface the lower one
defines (fine-tuning's model hooks: training.pipeline.train's hooks_for).
"""

import ast
from pathlib import Path

import pytest

from gptlab.training.config import ConfigError
from gptlab.training.pipeline import train

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gptlab"
LAYERS = ["core", "data", "inference", "training", "finetune", "interop", "serve", "cli", "facade"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    if module in ("gptlab", "gptlab.__main__"):
        return "facade"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def owning_module(name: str) -> str | None:
    """The gptlab module a dotted name lives in (a name imported from a module maps to that module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def imports(module: str) -> set[str]:
    """The gptlab modules `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # `from X import y`: the module X.y when y is one, else X (whose names y is)
            names = [
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target for alias in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            owner = owning_module(name) if name.startswith("gptlab") else None
            if owner and owner != module:
                found.add(owner)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def upward_imports() -> set[tuple[str, str]]:
    return {
        (module, target)
        for module, targets in GRAPH.items()
        for target in targets
        if LAYERS.index(layer(target)) > LAYERS.index(layer(module))
    }


def test_the_graph_is_read():
    """The reader sees the imports it must: relative, absolute and lazy ones."""
    assert "gptlab.model" in GRAPH["gptlab.checkpoint"]
    assert "gptlab.serve.server" in GRAPH["gptlab.cli.serve"]  # imported inside cmd_serve
    assert "gptlab.data" in GRAPH["gptlab.training.pipeline"]  # `from .. import data`


def test_no_upward_imports():
    upward = sorted(upward_imports())
    assert not upward, (
        "imports that point up a layer (move the code down, or plug it in through an interface "
        f"the lower layer defines): {upward}"
    )


def test_no_cycles():
    """No modules import each other in a circle, lazily or not (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = set()
            while not component or module not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_training_alone_refuses_what_only_fine_tuning_adds(tmp_path):
    """Training defines the interface fine-tuning plugs into; without the plug-in, adapter settings are
    refused in one line that says where they work, not dropped."""
    with pytest.raises(ConfigError, match=r"^--lora-rank needs fine-tuning's adapters.*call gptlab.train"):
        train(out=str(tmp_path / "run"), lora_rank=4, max_steps=1, device="cpu", log=lambda line: None)
