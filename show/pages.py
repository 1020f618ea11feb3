"""The HTML pages' one renderer: Jinja2 templates in ``show/templates``, one stylesheet, every value escaped.

The EDA page, the overlay gallery and the score report each have a template that extends
``page.html.j2`` (the stylesheet, the heading and the not-a-diagnostic-device notice). The
stylesheet is inlined, so that a page stays one file that opens from disk. Autoescaping is on
and an undefined name is an error, so that a patientId or a file name can never become markup
and a misspelt field fails a test instead of rendering empty.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from markupsafe import Markup

STYLESHEET = "lungdet.css"


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("lungdet.show", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def stylesheet() -> Markup:
    """The CSS every page inlines, as markup (its quotes must not be escaped inside ``<style>``)."""
    environment = _environment()
    assert environment.loader is not None
    source, _, _ = environment.loader.get_source(environment, STYLESHEET)
    return Markup(source.strip())


def render_page(template: str, *, title: str, heading: str, disclaimer: str, notice: str, **context: Any) -> str:
    """``template`` rendered with the frame's fields (``title``, ``heading``, ``disclaimer``, ``notice``) and ``context``."""
    return (
        _environment()
        .get_template(template)
        .render(
            stylesheet=stylesheet(),
            title=title,
            heading=heading,
            disclaimer=disclaimer,
            notice=notice,
            dark=context.pop("dark", False),
            **context,
        )
    )
