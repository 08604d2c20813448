"""MkDocs hook used by the documentation build (not part of the package).

Replaces the marker ``<!-- reexports -->`` in ``api/index.md`` with a table of
``numpyro_ebm.__all__``: each name, the first line of its docstring, and a link to where it
is documented (its defining module's page). The table therefore follows the package; a
name whose target is not documented fails ``mkdocs build --strict`` (unresolved
cross-reference).
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

MARKER = "<!-- reexports -->"


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n", 1)[0].replace("\n", " ").strip()
    first = re.sub(r":math:`([^`]+)`", r"\\(\1\\)", first)
    first = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", first)
    return first.replace("|", "\\|")


def reexport_table() -> str:
    pkg = importlib.import_module("numpyro_ebm")
    rows = ["| name | summary | documented in |", "|---|---|---|"]
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        if isinstance(obj, types.ModuleType):
            page = obj.__name__.removeprefix("numpyro_ebm.")
            rows.append(f"| [`{name}`]({page}.md) | {_summary(obj)} | module |")
        else:
            module = obj.__module__
            page = module.removeprefix("numpyro_ebm.")
            rows.append(
                f"| [`{name}`][{module}.{obj.__name__}] | {_summary(obj)} | [`{page}`]({page}.md) |"
            )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reexport_table())
    return markdown
