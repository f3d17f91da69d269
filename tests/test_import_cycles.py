"""No import cycle between any two modules of the repository's five packages (issue 12).

The import-linter contracts (tests/test_architecture.py) check cycles between siblings of one
package and the order of the layers; a loop between the roots' own modules (the package
`mistralrs_jax` itself, whose `__init__` imports `llm` lazily) or between two entry points in
one layer would slip past them. This test reads the whole module graph with grimp, the parser
import-linter uses, which records every import statement, those inside functions and under
`TYPE_CHECKING` included, and asks of each import a -> b whether b leads back to a.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mistralrs_jax", "pallas_kernels", "server", "tui", "benchmarks")


def module_cycles(*packages: str) -> list[list[str]]:
    """One shortest loop (as a chain of module names, first == last) per import that closes one."""
    graph = grimp.build_graph(*packages, cache_dir=None)
    loops = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if graph.chain_exists(importer=imported, imported=importer):
                back = graph.find_shortest_chain(importer=imported, imported=importer)
                loops.append([importer, *back])
    return loops


def test_the_detector_finds_a_loop_through_a_function_level_import(tmp_path, monkeypatch):
    package = tmp_path / "loopy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text(textwrap.dedent("""
        def late():
            from .a import thing  # a lazy import closes the loop all the same
            return thing
    """))
    (package / "c.py").write_text("from . import a\n")  # imports into the loop, is not part of it
    monkeypatch.syspath_prepend(str(tmp_path))
    loops = module_cycles("loopy")
    assert sorted(loops) == [["loopy.a", "loopy.b", "loopy.a"], ["loopy.b", "loopy.a", "loopy.b"]]


def test_the_repository_has_no_import_cycle(monkeypatch):
    if str(ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(ROOT))
    loops = module_cycles(*PACKAGES)
    assert not loops, "import cycles (importer -> ... -> importer):\n" + "\n".join(" -> ".join(loop) for loop in loops)
