"""MkDocs hook used by the documentation build (not part of the package).

``pymdownx.arithmatex`` (generic mode) leaves TeX in ``<span class="arithmatex">\\(...\\)``
and ``<div class="arithmatex">\\[...\\]``. This hook converts it to MathML at build time with
``latex2mathml``, so that browsers render the formulas without any script or network
access. Inline math that starts with ``\\displaystyle`` (what ``docs/_tools/griffe_rst.py``
makes of a ``.. math::`` directive) becomes display math. A formula that latex2mathml
cannot convert is left as TeX and logged as a warning, which fails ``mkdocs build --strict``.
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


def _to_mathml(tex: str, display: bool, where: str) -> str | None:
    tex = html.unescape(tex).strip()
    if tex.startswith(_DISPLAY):
        tex, display = tex[len(_DISPLAY):].strip(), True
    try:
        mathml = convert(tex, display="block" if display else "inline")
    except Exception as error:  # noqa: BLE001 - any failure: keep the TeX, warn
        log.warning("%s: cannot convert %r to MathML (%s)", where, tex, error)
        return None
    return f'<span class="math-display">{mathml}</span>' if display else mathml


def on_post_page(output: str, page, config) -> str:
    where = page.file.src_uri

    def inline(match: re.Match) -> str:
        return _to_mathml(match.group(1), False, where) or match.group(0)

    def block(match: re.Match) -> str:
        return _to_mathml(match.group(1), True, where) or match.group(0)

    return _INLINE.sub(inline, _BLOCK.sub(block, output))
