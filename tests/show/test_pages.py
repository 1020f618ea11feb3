"""The pages' one renderer: every page inlines the one stylesheet, escapes what it is given, and fails on a misspelt field."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from lungdet.show import pages, visualize


def test_every_page_inlines_the_one_stylesheet_and_says_it_is_not_a_diagnostic_device() -> None:
    page = visualize.render_index_html([visualize.OverlayEntry("p1", "p1.png", 1, 2, 0.9)], [])
    css = pages.stylesheet()
    assert css.startswith("/* The one stylesheet") and f"<style>\n{css}\n</style>" in page
    assert "<link" not in page  # one file that opens from disk: nothing fetched
    assert '<p class="notice"><b>Not a diagnostic device.</b>' in page
    assert '<body class="dark">' in page


def test_a_file_name_or_patient_id_never_becomes_markup() -> None:
    hostile = '<script>alert("x")</script>'
    page = visualize.render_index_html(
        [visualize.OverlayEntry(hostile, "a.png", None, None, None)], [(Path("b&c.dcm"), "bad <header>")]
    )
    assert hostile not in page
    assert "<b>&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;</b>" in page
    assert "<li><code>b&amp;c.dcm</code>: bad &lt;header&gt;</li>" in page


def test_a_field_the_template_names_but_nobody_gave_is_an_error() -> None:
    with pytest.raises(jinja2.UndefinedError, match="'legend' is undefined"):
        pages.render_page("overlays.html.j2", title="t", heading="h", disclaimer="d", notice="n")
