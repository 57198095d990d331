"""The reports' documents: a list of typed blocks (headings, paragraphs, notes, tables,
figures) rendered both as Markdown and as one self-contained HTML page (inline CSS, images
embedded as data URIs, no script), so the two always say the same thing.

Text may use the Markdown subset ``**bold**`` and ```code```."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdistill.files import atomic_write_text


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 1  # 1: the document's title, 2: a section


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Note:
    """A paragraph of small print: definitions, caveats, where the numbers come from."""

    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns


@dataclass(frozen=True)
class Figure:
    path: Path  # a PNG, relative to the document's folder
    alt: str  # also the caption in HTML


Block = Heading | Paragraph | Note | Table | Figure


def write_documents(blocks: list[Block], out_dir: Path, title: str, name: str = "report") -> Path:
    """Write ``name``.md and the self-contained ``name``.html (titled ``title``) into
    ``out_dir``, where the figures already are. Returns the Markdown file's path."""
    md = out_dir / f"{name}.md"
    atomic_write_text(md, render_markdown(blocks), name)
    atomic_write_text(out_dir / f"{name}.html", render_html(blocks, out_dir, title), name)
    return md


# ----------------------------------------------------------------------------- Markdown


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        out += _markdown(block)
        out.append("")
    return "\n".join(out)


def _markdown(block: Block) -> list[str]:
    match block:
        case Heading(text, level):
            return [f"{'#' * level} {text}"]
        case Paragraph(text) | Note(text):
            return [text]
        case Table(headers, rows, right):
            return [
                "| " + " | ".join(headers) + " |",
                "| " + " | ".join("---:" if i in right else "---" for i in range(len(headers))) + " |",
                *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows),
            ]
        case Figure(path, alt):
            return [f"![{alt}]({path.as_posix()})"]
    raise TypeError(f"not a document block: {block!r}")


# ----------------------------------------------------------------------------- HTML


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; }
th { background: #f3f5f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
p.note { color: #555; font-size: 0.9em; }
code { background: #f3f5f7; padding: 0 3px; border-radius: 3px; }
"""


def render_html(blocks: list[Block], base: Path, title: str) -> str:
    """One self-contained HTML page: inline CSS, images (read from ``base``) as base64 data
    URIs, no script."""
    body = "\n".join(_html(block, base) for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + body + "\n</body>\n</html>\n"
    )


def _html(block: Block, base: Path) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{_inline_html(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{_inline_html(text)}</p>"
        case Note(text):
            return f'<p class="note">{_inline_html(text)}</p>'
        case Table():
            return _html_table(block)
        case Figure(path, alt):
            data = base64.b64encode((base / path).read_bytes()).decode("ascii")
            return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}"><figcaption>{html.escape(alt)}</figcaption></figure>'
    raise TypeError(f"not a document block: {block!r}")


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_inline_html(h)}</th>" for h in table.headers)
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_inline_html(c)}</td>' if i in table.right else f"<td>{_inline_html(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _inline_html(text: str) -> str:
    """Escaped text with the Markdown subset the reports use: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
