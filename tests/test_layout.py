"""The package layout: stages import only the stages below them, and serving never imports torch.

The allowed directions are the table in ARCHITECTURE.md. Every ``import`` statement counts, also
the lazy ones inside functions, so a forbidden dependency fails here even when it is not executed.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tinydeploy"

#: Modules every stage may import: the standard-library-only helpers at the package root.
COMMON = {"tinydeploy", "tinydeploy.errors", "tinydeploy.atomic"}
#: Stage -> the other stages it may import (besides itself and COMMON).
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "data": set(),
    "model": set(),
    "growth": {"model"},
    "training": {"data", "model", "growth"},
    "export": {"data", "model", "training", "serving"},
    "serving": set(),
    "estimators": {"data", "model", "growth", "training", "export", "serving"},
}


def stage_of(module: str) -> str:
    """'tinydeploy.growth.linalg' -> 'growth'; the root helpers -> 'common'."""
    if module in COMMON:
        return "common"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "common"


def module_name(path: Path, repo: Path = REPO) -> str:
    parts = path.relative_to(repo).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = name.replace(".", "/")
    return (REPO / relative).is_dir() or (REPO / f"{relative}.py").is_file()


def tinydeploy_imports(path: Path) -> set[str]:
    """Absolute names of the tinydeploy modules ``path`` imports (``from a import b`` counts a.b if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if is_module(f"{node.module}.{alias.name}")}
    return {name for name in found if name == "tinydeploy" or name.startswith("tinydeploy.")}


def layering_violations(repo: Path = REPO) -> list[str]:
    """'module -> imported (stage a may not import stage b)' for every forbidden import in ``repo``'s package."""
    problems = []
    for path in sorted((repo / "tinydeploy").rglob("*.py")):
        name = module_name(path, repo)
        if name == "tinydeploy" or name == "tinydeploy.__main__" or name == "tinydeploy.serve_edge":
            continue  # the package root and the two entry-point aliases may reach any stage lazily
        own = stage_of(name)
        for imported in sorted(tinydeploy_imports(path)):
            other = stage_of(imported)
            if imported == "tinydeploy" and name.startswith("tinydeploy."):
                continue
            if other != own and other != "common" and other not in ALLOWED[own]:
                problems.append(f"{name} -> {imported} ({own} may not import {other})")
            if own == "common" and imported not in COMMON:
                problems.append(f"{name} -> {imported} (common modules import no stage)")
    return problems


def test_every_stage_imports_only_the_stages_below_it() -> None:
    assert layering_violations() == []


def test_the_layering_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The checker is not vacuous: a serving module importing growth (even lazily) is reported."""
    bad = tmp_path / "tinydeploy" / "serving"
    bad.mkdir(parents=True)
    (bad / "sneaky.py").write_text("def f():\n    from tinydeploy.growth import linalg\n    return linalg\n")
    assert layering_violations(tmp_path) == [
        "tinydeploy.serving.sneaky -> tinydeploy.growth (serving may not import growth)",
        "tinydeploy.serving.sneaky -> tinydeploy.growth.linalg (serving may not import growth)",
    ]


def test_every_package_directory_is_a_known_stage() -> None:
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert stages == set(ALLOWED) - {"common"}


_BLOCK_TORCH = """
import importlib.abc, json, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "sklearn", "torchvision") or name.startswith(("torch.", "sklearn.")):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
import importlib
module = importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("tinydeploy"))))
"""

SERVING_MODULES = sorted(module_name(p) for p in (PACKAGE / "serving").glob("*.py"))


@pytest.mark.parametrize("module", SERVING_MODULES)
def test_serving_module_imports_without_torch(module: str) -> None:
    """Each serving module loads where torch (and scikit-learn) cannot be imported, and pulls in no
    tinydeploy module outside serving and the common helpers."""
    done = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, module], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if m not in COMMON and not m.startswith("tinydeploy.serving")] == []
