"""The docs site builds cleanly and documents every public name.

`mkdocs build --strict` fails on a broken link, a missing page or anchor, and a reference mkdocstrings cannot
resolve; the API pages must show every public name (the `__all__` of each public module), and each of those names,
and each public method and attribute of a public class, must carry a docstring (an attribute may instead be
described in its class's `Attributes:` section). The Python examples in the pages themselves run through Sybil
(the root conftest.py), not here.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import griffe
import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "functionary_agent", "functionary_agent.conversation", "functionary_agent.tools", "functionary_agent.messages",
    "functionary_agent.events", "functionary_agent.errors", "functionary_agent.usage",
    "functionary_agent.run_context", "functionary_agent.models", "functionary_agent.integrations",
    "functionary_agent.testing", "sandbox",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-4000:]
    assert "WARNING" not in built.stderr, built.stderr[-4000:]
    return out


def _anchors(site: Path) -> set[str]:
    ids: set[str] = set()
    for page in (site / "reference").rglob("index.html"):
        ids.update(re.findall(r'id="([A-Za-z_][\w.]*)"', page.read_text()))
    return ids


def test_the_site_builds_strictly_and_has_its_pages(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "guides/tools/index.html", "reference/index.html",
                 "search/search_index.json"):
        assert (site / page).is_file(), page


def test_every_public_name_has_a_place_in_the_api_reference(site: Path) -> None:
    anchors = _anchors(site)
    exported = {module: importlib.import_module(module).__all__ for module in PUBLIC_MODULES}
    missing = []
    for module, names in exported.items():
        for name in names:
            places = {f"{module}.{name}"} | {f"{other}.{name}" for other, there in exported.items() if name in there}
            if not places & anchors:
                missing.append(f"{module}.{name}")
    assert not missing, f"public names with no entry in docs/reference: {missing}"


def _documented_attributes(cls: griffe.Object) -> set[str]:
    if not cls.docstring:
        return set()
    return {attribute.name for section in cls.docstring.parse("google") if section.kind.value == "attributes"
            for attribute in section.value}


def _undocumented(obj: griffe.Object) -> list[str]:
    found = [] if obj.docstring else [obj.path]
    if obj.is_class:
        described = _documented_attributes(obj)
        for name, member in obj.members.items():
            if name.startswith("_") or member.docstring or name in described:
                continue
            inherited = any(name in base.members and base.members[name].docstring for base in obj.mro())
            if not (member.is_function and inherited):
                found.append(f"{obj.path}.{name}")
    return found


def test_every_public_name_has_a_docstring() -> None:
    roots = {name: griffe.load(name, search_paths=[str(ROOT)]) for name in ("functionary_agent", "sandbox")}
    missing: set[str] = set()
    for module in PUBLIC_MODULES:
        package, _, rest = module.partition(".")
        loaded = roots[package][rest] if rest else roots[package]
        for name in importlib.import_module(module).__all__:
            missing.update(_undocumented(loaded[name]))
    assert not missing, f"public names without a docstring: {sorted(missing)}"


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    """A newcomer's page: at most 250 lines, and every relative link names a file that exists (anchors within the
    docs are checked by the strict build)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)\s]*)?\)", readme)
    assert targets, "the README links into the docs"
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
