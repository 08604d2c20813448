"""Griffe extension used by the documentation build (not part of the package).

The docstrings of numpyro_ebm are numpydoc with a few reST constructs. mkdocstrings renders
Markdown, so before rendering this extension rewrites, in every docstring of the package:

* ``:math:`TEX``` into ``\\(TEX\\)`` (inline math, picked up by ``pymdownx.arithmatex``);
* a ``.. math::`` directive (content on the directive line and/or an indented block) into a
  line ``\\(\\displaystyle TEX\\)``; ``docs/_tools/mathml.py`` turns ``\\displaystyle`` math
  into display MathML. An inline form is used so that the indentation of a directive inside
  a list item does not matter;
* ``:func:`x```, ``:class:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:`` into
  an optional cross-reference to the object (resolved in the scope of the docstring's
  object; a leading ``~`` shows only the last component). An unresolved optional reference
  renders as plain code, without a warning.
"""

from __future__ import annotations

import html
import re

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::[ \t]*(.*)$")
_ORDERED_ITEM = re.compile(r"^(\s*)\d+[.)][ \t]+")
_FIELD_NAME = re.compile(r"^([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*)\s*$")
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def convert_math_blocks(text: str) -> str:
    """Replace each ``.. math::`` directive by one display-math line at its indentation."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        body = [match.group(2).strip()] if match.group(2).strip() else []
        i += 1
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                if body:
                    break
                i += 1  # blank line between the directive and its block
                continue
            if _indent(line) <= len(indent):
                break
            body.append(line.strip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}\\(\\displaystyle {' '.join(body)}\\)")
        out.append("")
    return "\n".join(out)


def indent_ordered_items(text: str) -> str:
    """Indent the blank-line-separated blocks of ordered-list items to 4 spaces.

    reST aligns an item's later paragraphs with its text (3 spaces after ``1. ``);
    Python-Markdown needs 4, or the list is cut into pieces. An item that follows such a
    block directly also gets a blank line before it, or Markdown reads it as a
    continuation of that block.
    """
    out: list[str] = []
    base = shift = None
    after_blank = False
    for line in text.split("\n"):
        match = _ORDERED_ITEM.match(line)
        if match is not None:
            if base is not None and after_blank and out and out[-1].strip():
                out.append("")
            base = len(match.group(1))
            shift = max(0, 4 - (match.end() - base))
            after_blank = False
            out.append(line)
            continue
        if base is not None:
            if not line.strip():
                after_blank = True
            elif _indent(line) < base + 4 - shift:  # not part of the item
                base = None
            elif after_blank and shift:
                line = " " * shift + line
        out.append(line)
    return "\n".join(out)


def field_lists(text: str) -> str:
    """Turn numpydoc-style field lists outside any section into Markdown bullet lists.

    Some class docstrings (named tuples) list their fields as ``name`` followed by an
    indented description, without a section header; Markdown would run them together into
    one paragraph. Only the text before the first numpydoc section header is changed.
    """
    lines = text.split("\n")
    end = next(
        (k for k in range(len(lines) - 1) if lines[k].strip() and _UNDERLINE.match(lines[k + 1])),
        len(lines),
    )
    out: list[str] = []
    in_list = False
    for k in range(end):
        line = lines[k]
        nxt = lines[k + 1] if k + 1 < len(lines) else ""
        match = _FIELD_NAME.match(line)
        if match and nxt.strip() and _indent(nxt) >= 4:
            if out and out[-1].strip() and not in_list:
                out.append("")
            names = ", ".join(f"`{n.strip()}`" for n in match.group(1).split(","))
            out.append(f"* {names}:")
            in_list = True
            continue
        if in_list and line.strip() and _indent(line) < 4:
            if out[-1].strip():
                out.append("")
            in_list = False
        out.append(line)
    return "\n".join(out + lines[end:])


def _xref(obj: griffe.Object, target: str) -> str:
    short = target.startswith("~")
    name = target.lstrip("~.")
    title = name.rsplit(".", 1)[-1] if short else name
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head)
        path = f"{path}.{rest}" if rest else path
    except Exception:  # not in scope: keep the name as written (a full dotted path)
        path = name
    return (
        f'<autoref identifier="{html.escape(path, quote=True)}" optional>'
        f"<code>{html.escape(title)}</code></autoref>"
    )


def convert(text: str, obj: griffe.Object) -> str:
    text = indent_ordered_items(convert_math_blocks(field_lists(text)))
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    return _XREF_ROLE.sub(lambda m: _xref(obj, m.group(1)), text)


class ReSTRoles(griffe.Extension):
    """Rewrite the reST roles and math directives of a package's docstrings to Markdown."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj)
            for member in obj.members.values():
                if not member.is_alias:
                    stack.append(member)
