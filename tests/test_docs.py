"""The documentation site builds with warnings as errors, and its API reference is complete.

One ``mkdocs build --strict`` per session (a module-scoped fixture, a few seconds): broken links,
unresolved cross-references and docstring warnings fail the build. The assertions then check
real content: every page of the navigation was rendered, no ``:::`` directive was left as text,
the reference shows the constructor arguments of the callbacks (read from their signatures here,
so a reference that stops being generated fails), and every name in each package's ``__all__``
has an entry in some reference page.
"""

from __future__ import annotations

import html
import importlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The packages whose API the reference documents (docs/reference/*.md).
DOCUMENTED_PACKAGES = (
    "lightning_optdiag.callbacks",
    "lightning_optdiag.curvature",
    "lightning_optdiag.signals",
    "lightning_optdiag.diagnosis",
    "lightning_optdiag.optim",
    "lightning_optdiag.schedules",
    "lightning_optdiag.lr_range",
    "lightning_optdiag.report",
    "lightning_optdiag.autoattach",
)

pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e .[docs])")
pytest.importorskip("material", reason="mkdocs-material is not installed")
pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] not installed")
import yaml  # noqa: E402  (installed with mkdocs)


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold ``!!python/name:`` and ``!ENV`` tags: read them as plain values."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


def _nav_pages(nav: Any) -> Iterator[str]:
    """The Markdown files named in the ``nav`` of mkdocs.yml, in order."""
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def _page_html(site: Path, page: str) -> Path:
    """Where mkdocs writes ``page`` with directory URLs (``a/b.md`` -> ``a/b/index.html``)."""
    stem = page.removesuffix(".md")
    if stem == "index":
        return site / "index.html"
    return site / stem.removesuffix("/index") / "index.html"


def _text(page: Path) -> str:
    """The visible text of a built page, without tags."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site once for this module, with warnings as errors."""
    site_dir = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return site_dir


@pytest.fixture(scope="module")
def reference_html(site: Path) -> str:
    """All reference pages' HTML, concatenated."""
    pages = sorted((site / "reference").glob("*/index.html"))
    assert pages, "no reference page was built"
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def test_config_is_strict_and_uses_the_docs_dir(config: dict[str, Any]) -> None:
    assert config["strict"] is True
    assert config["docs_dir"] == "docs"


def test_every_nav_page_exists_and_was_built(site: Path, config: dict[str, Any]) -> None:
    pages = list(_nav_pages(config["nav"]))
    assert "index.md" in pages
    assert len(pages) == len(set(pages)), "a page appears twice in the nav"
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), f"{page} is in the nav but not in docs/"
        built = _page_html(site, page)
        assert built.is_file(), f"{page} was not built to {built}"
        assert len(_text(built).split()) > 50, f"{page} rendered almost empty"


def test_every_markdown_page_is_in_the_nav(config: dict[str, Any]) -> None:
    pages = set(_nav_pages(config["nav"]))
    on_disk = {
        path.relative_to(ROOT / "docs").as_posix()
        for path in (ROOT / "docs").rglob("*.md")
        if not any(part.startswith("_") for part in path.relative_to(ROOT / "docs").parts)
    }
    assert on_disk - pages == set(), "pages missing from the nav of mkdocs.yml"


def test_no_directive_is_left_unrendered(site: Path) -> None:
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"(^|>)\s*:::\s", text, re.MULTILINE), f"raw ::: in {page}"


def test_no_rest_markup_reaches_the_reference(reference_html: str) -> None:
    # The docstrings' reST roles and math blocks are rewritten by docs/_griffe/rst_markup.py.
    text = html.unescape(re.sub(r"<[^>]+>", " ", reference_html))
    for leftover in (":class:", ":func:", ":meth:", ":math:", ":data:", ".. math::", "Example::"):
        assert leftover not in text
    assert 'class="arithmatex"' in reference_html  # the SWATS / LAMB equations


@pytest.mark.parametrize(
    "qualname",
    [
        "lightning_optdiag.callbacks.CurvatureMonitor",
        "lightning_optdiag.callbacks.GradientMonitor",
        "lightning_optdiag.callbacks.NonFiniteGuard",
        "lightning_optdiag.callbacks.TrainingDoctor",
        "lightning_optdiag.callbacks.OptimizerSwitch",
        "lightning_optdiag.callbacks.ScheduleAdvisor",
    ],
)
def test_callback_reference_lists_its_arguments(site: Path, qualname: str) -> None:
    module_name, _, class_name = qualname.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    arguments = [name for name in inspect.signature(cls).parameters if name != "self"]
    assert arguments
    page = (site / "reference" / "callbacks" / "index.html").read_text(encoding="utf-8")
    start = page.find(f'id="{qualname}"')
    assert start >= 0, f"no reference entry for {qualname}"
    following = [page.find(f'id="{module_name}.{other}"', start + 1) for other in _all(module_name)]
    end = min([index for index in following if index > start], default=len(page))
    entry = html.unescape(re.sub(r"<[^>]+>", " ", page[start:end]))
    for argument in arguments:
        # In the signature and in the documented parameters.
        assert len(re.findall(rf"\b{re.escape(argument)}\b", entry)) >= 2, (
            f"{qualname}: argument {argument!r} missing from its reference entry"
        )


def _all(module_name: str) -> list[str]:
    names = getattr(importlib.import_module(module_name), "__all__", None)
    assert names, f"{module_name} has no __all__"
    return list(names)


@pytest.mark.parametrize("module_name", DOCUMENTED_PACKAGES)
def test_every_public_name_has_a_reference_entry(reference_html: str, module_name: str) -> None:
    missing = [
        name for name in _all(module_name) if f'id="{module_name}.{name}"' not in reference_html
    ]
    assert missing == [], f"add these to docs/reference/: {missing}"


def test_every_package_with_a_reference_page_is_checked() -> None:
    pages = {path.stem for path in (ROOT / "docs" / "reference").glob("*.md")}
    assert pages == {name.rsplit(".", 1)[-1] for name in DOCUMENTED_PACKAGES}
