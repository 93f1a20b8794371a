"""PyTorch's private and recent APIs are reached through gptlab/torch_compat.py alone, the declared floor
is the one it checks, and an API a release drops fails in one line that names it."""

import ast
import re
import tomllib
from pathlib import Path

import pytest
import torch

from gptlab import torch_compat
from gptlab.torch_compat import TORCH_FLOOR, TorchVersionError, check_torch_version, int4_pack, muon_class, private

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "gptlab"
PRIVATE_ATTRIBUTES = {"_version", "_init_group"}  # private names reached on objects torch made


def dotted(node: ast.AST) -> list[str]:
    """a.b.c → ['a', 'b', 'c'] (empty for anything but a chain of names)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


def private_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):  # import torch._x, from torch.a._b import c
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}: import {module}"
                for module in modules
                if module.split(".")[0] == "torch" and any(part.startswith("_") for part in module.split("."))
            ]
        if not isinstance(node, ast.Attribute):
            continue
        chain = dotted(node)
        private_torch = chain[:1] == ["torch"] and (
            chain[1:2] == ["ops"] or any(part.startswith("_") and not part.startswith("__") for part in chain[1:])
        )
        if private_torch or node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {'.'.join(chain) or node.attr}")
    return found


def test_no_module_but_torch_compat_reaches_private_torch_apis():
    uses = [
        use for path in sorted(PACKAGE.rglob("*.py")) if path.name != "torch_compat.py" for use in private_uses(path)
    ]
    assert uses == []
    assert private_uses(PACKAGE / "torch_compat.py")  # the scan does see them where they are


def test_the_declared_floor_is_the_checked_one():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [spec for spec in dependencies if re.match(r"torch\b", spec)]
    assert torch_requirement == "torch>=" + ".".join(map(str, TORCH_FLOOR))
    assert hasattr(torch.optim, "Muon")  # what sets the floor


@pytest.mark.parametrize(
    "version, ok",
    [
        ("2.8.1", False),
        ("2.1.0+cpu", False),
        ("1.13.0", False),
        ("2.9.0", True),
        ("2.13.0+cpu", True),
        ("2.10.0.dev20260101", True),
    ],
)
def test_an_older_torch_is_refused_in_one_line(version, ok):
    if ok:
        check_torch_version(version)
        return
    with pytest.raises(TorchVersionError) as error:
        check_torch_version(version)
    message = str(error.value)
    assert "\n" not in message and f"torch {version}" in message
    assert "torch >= 2.9" in message and "pip install -c constraints.txt torch" in message


def test_a_dropped_private_api_is_named(monkeypatch):
    q = torch.randint(0, 16, (16, 32), dtype=torch.int32)
    assert int4_pack(q).dtype == torch.uint8
    monkeypatch.delattr(torch, "_convert_weight_to_int4pack_for_cpu")
    with pytest.raises(TorchVersionError, match=r"no torch\._convert_weight_to_int4pack_for_cpu, which gptlab uses"):
        int4_pack(q)
    with pytest.raises(TorchVersionError, match=r"torch\.ops\.mkldnn\._nothing"):
        private(torch.ops.mkldnn, "_nothing", "torch.ops.mkldnn._nothing")
    monkeypatch.delattr(torch.optim.Muon, "_init_group")
    with pytest.raises(TorchVersionError, match=r"torch\.optim\.Muon\._init_group"):
        muon_class()
    assert torch_compat.install_hint().endswith(f"this is torch {torch.__version__}")
