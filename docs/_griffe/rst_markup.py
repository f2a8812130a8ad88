"""Griffe extension for the documentation site: the reST markup of the docstrings, in Markdown.

The package's docstrings are Google style with a few reStructuredText constructs that Sphinx
would understand and Markdown does not. Before mkdocstrings renders a docstring, this rewrites:

- ``.. math::`` blocks into ``$$ ... $$`` blocks and ``:math:`x``` into ``$x$`` (rendered by
  ``pymdownx.arithmatex`` and MathJax);
- cross-reference roles (``:class:``, ``:func:``, ``:meth:``, ``:data:``, ``:attr:``, ``:mod:``,
  ``:exc:``, ``:obj:``) into inline code, ``~`` keeping the last component as Sphinx does;
- ``Example::`` followed by an indented literal block into an example admonition holding a
  fenced Python block, and ``Example:`` followed by ``>>>`` lines into an ``Examples:`` section
  (which griffe renders as console code).

The source files are never touched. Loaded by ``mkdocs.yml`` (mkdocstrings' python handler,
``extensions``); excluded from the built site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*$")
_LITERAL_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)(?P<title>Examples?)::[ \t]*$")
_DOCTEST_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _indented_block(lines: list[str], start: int, indent: int) -> int:
    """Index just past the block of lines indented deeper than ``indent`` from ``start``.

    Leading blank lines belong to the block; trailing blank lines do not."""
    end = start
    last = start
    while end < len(lines):
        line = lines[end]
        if line.strip():
            if _indent_of(line) <= indent:
                break
            last = end + 1
        end += 1
    return last


def _role_text(match: re.Match[str]) -> str:
    target = re.sub(r"\s+", "", match.group(1))
    titled = re.fullmatch(r"(.+)<(.+)>", match.group(1).strip())
    if titled:
        return f"`{titled.group(1).strip()}`"
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_role(match: re.Match[str]) -> str:
    return "$" + match.group(1).strip() + "$"


def rst_to_markdown(text: str) -> str:
    """Rewrite the reST constructs of one docstring (see the module docstring)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        math = _MATH_BLOCK.match(line)
        literal = _LITERAL_EXAMPLE.match(line)
        doctest = _DOCTEST_EXAMPLE.match(line)
        if math:
            indent = math.group("indent")
            end = _indented_block(lines, i + 1, len(indent))
            body = [body_line for body_line in lines[i + 1 : end] if body_line.strip()]
            out.append(f"{indent}$$")
            out.extend(f"{indent}{body_line.strip()}" for body_line in body)
            out.append(f"{indent}$$")
            i = end
            continue
        if literal:
            indent = literal.group("indent")
            end = _indented_block(lines, i + 1, len(indent))
            body = lines[i + 1 : end]
            while body and not body[0].strip():
                body.pop(0)
            depth = min((_indent_of(b) for b in body if b.strip()), default=len(indent) + 4)
            inner = indent + "    "
            out.append(f"{indent}{literal.group('title')}:")
            out.append(f"{inner}```python")
            out.extend(inner + b[depth:] if b.strip() else "" for b in body)
            out.append(f"{inner}```")
            i = end
            continue
        if doctest and i + 1 < len(lines) and lines[i + 1].strip().startswith(">>>"):
            out.append(f"{doctest.group('indent')}Examples:")
            i += 1
            continue
        out.append(line)
        i += 1
    converted = "\n".join(out)
    converted = _MATH_ROLE.sub(_math_role, converted)
    return _ROLE.sub(_role_text, converted)


class RstMarkup(griffe.Extension):
    """Rewrites every docstring once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
