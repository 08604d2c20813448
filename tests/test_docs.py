"""The documentation site builds with ``mkdocs build --strict`` and holds the API pages.

Skipped when the documentation tools (the ``dev`` extra) are not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("latex2mathml")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "numpyro_ebm"
NOT_DOCUMENTED = {"cli"}  # the command line is documented by `numpyro-ebm --help`


def _public_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if any(part.startswith("_") for part in rel.parts):
            continue
        name = ".".join(rel.parts)
        if name not in NOT_DOCUMENTED:
            names.append(name)
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_every_public_module_has_an_api_page():
    pages = {p.stem for p in (ROOT / "docs" / "api").glob("*.md")}
    missing = [m for m in _public_modules() if m not in pages]
    assert not missing, f"modules without a page in docs/api/: {missing}"


def test_api_pages_are_built(site):
    for module in ["index", *_public_modules()]:
        page = site / "api" / f"{module}.html"
        assert page.is_file(), page
        text = page.read_text(encoding="utf-8")
        if module != "index":
            assert f'id="numpyro_ebm.{module}"' in text, f"{module}: no API heading"
    for page in ["index", "settings", "gmm", "frontends", "diagnostics", "schedule"]:
        assert (site / f"{page}.html").is_file(), page
    assert (site / "figures" / "gmm.png").is_file()


def test_top_level_reexports_are_linked(site):
    import numpyro_ebm

    text = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in numpyro_ebm.__all__:
        assert f"<code>{name}</code></a>" in text, name


def test_docstring_markup_is_rendered(site):
    """reST math and cross-reference roles become MathML and links, not literal text."""
    for page in sorted((site / "api").glob("*.html")) + [site / "index.html"]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r":(math|func|class|meth|mod|attr):`", text), page.name
        assert ".. math::" not in text, page.name
        assert 'class="arithmatex"' not in text, f"{page.name}: TeX left unconverted"
    fit_page = (site / "api" / "training.fit.html").read_text(encoding="utf-8")
    assert "<math" in fit_page
    assert 'href="kernels.base.html#numpyro_ebm.kernels.base.JarzynskiState' in fit_page
    # no network access is needed to view the site: no web fonts, no remote scripts
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis" not in index
    assert not re.search(r'<script[^>]+src="https?://', index)


def _hook(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "_tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_display_math_is_split_at_top_level_qquad():
    split = _hook("mathml").split_equations
    alpha = (r"A' = A + \alpha_k(X, X') - \alpha_{k+1}(X', X), \qquad"
             r" \alpha_k(x, y) = U_k(x) + \tfrac{h}{4} |\nabla U_k(x)|^2 .")
    assert split(alpha) == [r"A' = A + \alpha_k(X, X') - \alpha_{k+1}(X', X),",
                            r"\alpha_k(x, y) = U_k(x) + \tfrac{h}{4} |\nabla U_k(x)|^2 ."]
    # not inside braces or \left ... \right, and \qquadx is not \qquad
    assert split(r"\left( a \qquad b \right) \qquad c_{d \qquad e}") == [
        r"\left( a \qquad b \right)", r"c_{d \qquad e}"]
    assert split(r"a = b") == ["a = b"]


def test_widehat_becomes_a_stretched_css_hat_and_hat_stays():
    hook = _hook("mathml")
    out = hook._to_mathml(r"\hat H_k + \widehat{\log Z_{\theta_k}/Z_{\theta_0}}", False, "t")
    # latex2mathml's \widehat: a non-accent <mover> with an ASCII caret that is not stretched
    assert not re.search(r"<mover><mrow>(?:(?!</mover>).)*<mo>&#x0005E;</mo></mover>", out)
    assert out.count('<mrow class="widehat">') == 1
    assert '<mover accent="true"><mi>H</mi><mo>&#x0005E;</mo></mover>' in out  # \hat H
    nested = hook._to_mathml(r"\widehat{a + \widehat{b}}", False, "t")
    assert nested.count('<mrow class="widehat">') == 2 and "<mover>" not in nested


def test_built_pages_have_no_stray_caret_and_wrap_long_formulas(site):
    stray = re.compile(r"<mover><mrow>(?:(?!</mover>).)*<mo>&#x0005E;</mo></mover>", re.DOTALL)
    for page in sorted(site.rglob("*.html")):
        assert not stray.search(page.read_text(encoding="utf-8")), page.name
    for page in (site / "index.html", site / "api" / "kernels.jarzynski_ula.html"):
        text = page.read_text(encoding="utf-8")
        pieces = re.findall(r'<span class="math-display math-pieces">(.*?)</span>', text, re.DOTALL)
        alpha = [p for p in pieces if "&#x003B1;" in p]  # the alpha_k update
        assert alpha and alpha[0].count("<math") == 2, page.name
    assert 'class="widehat"' in (site / "index.html").read_text(encoding="utf-8")
    css = (site / "stylesheets" / "extra.css").read_text(encoding="utf-8")
    assert "flex-wrap: wrap" in css and ".widehat" in css and "overflow-x: auto" in css
