"""The check that a report page is well formed and self-contained (used by the report
tests and scripts/render_report.py; the package itself never needs it)."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

from PIL import Image

from kdistill.errors import ReportError

VOID_TAGS = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}
EMBEDDED_PNG = "data:image/png;base64,"


def check_html(text: str) -> dict[str, int]:
    """Check that a report page is well formed and self-contained: balanced tags, no script,
    no external resource (every ``src``/``href`` is a fragment or an embedded PNG that
    decodes), every table with a header and rows. Returns counts of tables, table rows and
    images; raises ReportError listing the problems."""
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    problems = parser.problems
    if parser.stack:
        problems.append(f"unclosed tags at the end: {', '.join(parser.stack)}")
    if re.search(r"url\(\s*['\"]?(?!data:)", text):
        problems.append("CSS url() to an external resource")
    if problems:
        raise ReportError("report HTML is not self-contained and well formed: " + "; ".join(problems[:10]))
    return parser.counts


class _PageParser(HTMLParser):
    """Counts tables, rows and images; notes every problem with its line."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.counts = {"tables": 0, "rows": 0, "images": 0}
        self.stack: list[str] = []  # the open elements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        line = self.getpos()[0]
        if tag == "script":
            self.problems.append(f"line {line}: <script> (reports carry no scripts)")
        if tag == "link":
            self.problems.append(f"line {line}: <link> to an external resource")
        if tag == "table":
            self.counts["tables"] += 1
        if tag == "tr":
            self.counts["rows"] += 1
        for name in ("src", "href"):
            value = attributes.get(name)
            if value is not None and not value.startswith("#"):
                self._check_resource(tag, name, value, line)
        if tag == "img":
            self.counts["images"] += 1
            if not attributes.get("alt"):
                self.problems.append(f"line {line}: <img> without alt text")
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(
                f"line {self.getpos()[0]}: </{tag}> does not close <{self.stack[-1] if self.stack else 'nothing'}>"
            )
            if tag in self.stack:
                del self.stack[len(self.stack) - 1 - self.stack[::-1].index(tag) :]
            return
        self.stack.pop()

    def _check_resource(self, tag: str, name: str, value: str, line: int) -> None:
        """A ``src``/``href`` must be an embedded PNG that decodes to a non-empty image."""
        if not value.startswith(EMBEDDED_PNG):
            self.problems.append(f"line {line}: <{tag} {name}={value[:60]!r}> is not embedded")
            return
        try:
            with Image.open(io.BytesIO(base64.b64decode(value.split(",", 1)[1], validate=True))) as img:
                img.load()
                if img.width == 0 or img.height == 0:
                    raise ValueError("empty image")
        except Exception as e:  # any decoding failure means a broken image
            self.problems.append(f"line {line}: embedded image does not decode ({e})")
