"""The packages' import graphs: no import cycle inside a package (type-only imports under
TYPE_CHECKING and imports inside functions count too: a cycle is a design knot whichever way it is
spelled), and `shared/` imports none of the services."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness import REPO

PACKAGES = ("gateway_svc", "scheduler_svc", "runner_svc", "shared", "runwire_cli")
SERVICES = ("gateway_svc", "scheduler_svc", "runner_svc")


def module_name(package: str, path: Path) -> str:
    rel = path.relative_to(REPO / package).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(package: str, path: Path) -> set[str]:
    """Every module this file imports, anywhere in it, as absolute dotted names."""
    name = module_name(package, path)
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            # `from . import api` imports the module gateway_svc.api
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def graph(package: str) -> dict[str, set[str]]:
    files = sorted((REPO / package).rglob("*.py"))
    mods = {module_name(package, f): f for f in files}
    return {m: {i for i in imports_of(package, f) if i in mods and i != m} for m, f in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package: str) -> None:
    cycle = find_cycle(graph(package))
    assert cycle is None, f"import cycle in {package}: {' -> '.join(cycle or [])}"


def test_shared_imports_no_service() -> None:
    for path in sorted((REPO / "shared").rglob("*.py")):
        bad = sorted(i for i in imports_of("shared", path) if i.split(".")[0] in SERVICES)
        assert not bad, f"{path.relative_to(REPO)} imports {bad}: shared/ is the contract, below the services"
