"""MkDocs hook used by the documentation build (not part of the package).

``pymdownx.arithmatex`` (generic mode) leaves TeX in ``<span class="arithmatex">\\(...\\)``
and ``<div class="arithmatex">\\[...\\]``. This hook converts it to MathML at build time with
``latex2mathml``, so that browsers render the formulas without any script or network
access. Inline math that starts with ``\\displaystyle`` (what ``docs/_tools/griffe_rst.py``
makes of a ``.. math::`` directive) becomes display math. A formula that latex2mathml
cannot convert is left as TeX and logged as a warning, which fails ``mkdocs build --strict``.

Two things MathML in browsers does not do by itself, done here:

* **Long display formulas.** Browsers do not break a MathML formula across lines. A display
  formula made of several equations separated by a top-level ``\\qquad`` (``a = b, \\qquad
  c = d``) is rendered as one MathML block per equation in a wrapping flex row
  (``.math-pieces`` in ``docs/stylesheets/extra.css``): side by side when they fit, one
  under the other on a narrow page, instead of running off the right edge.
* **Wide hats.** latex2mathml turns ``\\widehat{...}`` into an ``<mover>`` with an ASCII
  caret that browsers do not stretch: a small caret lands in the middle of the
  expression. It is replaced by ``<mrow class="widehat">``, whose hat the stylesheet draws
  over the whole expression. ``\\hat`` (one symbol) is left to the browser.
"""

from __future__ import annotations

import html
import logging
import re

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.DOTALL)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.DOTALL)
_DISPLAY = "\\displaystyle"
_MOVER = re.compile(r"<mover>|</mover>")
_WIDEHAT_TAIL = "<mo>&#x0005E;</mo>"


def split_equations(tex: str) -> list[str]:
    """``tex`` cut at every ``\\qquad`` outside braces and ``\\left ... \\right``."""
    pieces, start, depth = [], 0, 0
    for match in re.finditer(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\qquad(?![A-Za-z])|[{}]", tex):
        token = match.group(0)
        if token in ("{", "\\left"):
            depth += 1
        elif token in ("}", "\\right"):
            depth -= 1
        elif depth == 0:
            pieces.append(tex[start:match.start()].strip())
            start = match.end()
    pieces.append(tex[start:].strip())
    return [p for p in pieces if p]


def widehat_to_class(mathml: str) -> str:
    """Replace each ``<mover>BODY<mo>^</mo></mover>`` (latex2mathml's ``\\widehat``) by
    ``<mrow class="widehat">BODY</mrow>``; other ``<mover>`` elements are kept."""
    pos = 0
    while True:
        opening = mathml.find("<mover>", pos)
        if opening < 0:
            return mathml
        depth, end = 0, None
        for tag in _MOVER.finditer(mathml, opening):
            depth += 1 if tag.group(0) == "<mover>" else -1
            if depth == 0:
                end = tag.start()
                break
        inner = "" if end is None else mathml[opening + len("<mover>"):end]
        if not inner.endswith(_WIDEHAT_TAIL):
            pos = opening + 1
            continue
        body = inner[: -len(_WIDEHAT_TAIL)]
        mathml = f'{mathml[:opening]}<mrow class="widehat">{body}</mrow>{mathml[end + len("</mover>"):]}'


def _convert(tex: str, display: bool) -> str:
    return widehat_to_class(convert(tex, display="block" if display else "inline"))


def _to_mathml(tex: str, display: bool, where: str) -> str | None:
    tex = html.unescape(tex).strip()
    if tex.startswith(_DISPLAY):
        tex, display = tex[len(_DISPLAY):].strip(), True
    try:
        if not display:
            return _convert(tex, False)
        pieces = split_equations(tex)
        if len(pieces) == 1:
            return f'<span class="math-display">{_convert(tex, True)}</span>'
        blocks = "".join(_convert(p, True) for p in pieces)
        return f'<span class="math-display math-pieces">{blocks}</span>'
    except Exception as error:  # noqa: BLE001 - any failure: keep the TeX, warn
        log.warning("%s: cannot convert %r to MathML (%s)", where, tex, error)
        return None


def on_post_page(output: str, page, config) -> str:
    where = page.file.src_uri

    def inline(match: re.Match) -> str:
        return _to_mathml(match.group(1), False, where) or match.group(0)

    def block(match: re.Match) -> str:
        return _to_mathml(match.group(1), True, where) or match.group(0)

    return _INLINE.sub(inline, _BLOCK.sub(block, output))
