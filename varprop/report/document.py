"""One model of a report, rendered to Markdown and to a self-contained HTML page.

Text blocks use a little inline Markdown (``code``, **bold**, *italic*). In
HTML every string is escaped first and only then formatted, so nothing from
the user (labels, titles, file names, option values) can become markup.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

_ENV = Environment(loader=PackageLoader("varprop.report", "templates"), autoescape=select_autoescape(["html"]))


@dataclass
class Document:
    """A title and a list of blocks: (kind, payload)."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def h3(self, text: str) -> None:
        self.blocks.append(("h3", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def items(self, items: list[str]) -> None:
        self.blocks.append(("list", list(items)))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def figure(self, file: str, alt: str) -> None:
        self.blocks.append(("figure", (file, alt)))


def to_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""]
    for kind, x in doc.blocks:
        if kind == "h2":
            out += [f"## {x}", ""]
        elif kind == "h3":
            out += [f"### {x}", ""]
        elif kind == "p":
            out += [x, ""]
        elif kind == "code":
            out += ["```", x, "```", ""]
        elif kind == "list":
            out += [f"- {item}" for item in x] + [""]
        elif kind == "table":
            out += [x.to_markdown(index=False, disable_numparse=True), ""]
        elif kind == "figure":  # SVG, with the PNG beside it for renderers without SVG
            svg = str(Path(x[0]).with_suffix(".svg"))
            out += [f"![{x[1]}]({svg})", "", f"<sub>PNG: [{x[0]}]({x[0]})</sub>", ""]
    return "\n".join(out)


def inline(text: str) -> str:
    """Escape, then turn `code`, **bold** and *italic* into HTML.

    >>> inline("a <b> `x<y` **no**")
    'a &lt;b&gt; <code>x&lt;y</code> <strong>no</strong>'
    """
    parts = re.split(r"(`[^`]*`)", str(text))
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)
        out.append(s)
    return "".join(out)


def _slug(text: str, seen: dict[str, int]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}-{seen[base]}"


# A section's subsections are listed in the contents up to this many; beyond (one per configuration of
# a large comparison), they fold under a <details> so that the findings stay near the top of the page.
TOC_OPEN = 8


def to_html(doc: Document, figure_dir: Path) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG, no scripts."""
    seen: dict[str, int] = {}
    blocks, toc = [], []
    for kind, x in doc.blocks:
        if kind in ("h2", "h3"):
            anchor = _slug(x, seen)
            entry = {"anchor": anchor, "text": x, "children": []}
            (toc[-1]["children"] if kind == "h3" and toc else toc).append(entry)
            blocks.append({"kind": kind, "anchor": anchor, "html": inline(x)})
        elif kind == "p":
            blocks.append({"kind": "p", "html": inline(x)})
        elif kind == "code":
            blocks.append({"kind": "code", "text": x})
        elif kind == "list":
            blocks.append({"kind": "list", "entries": [inline(i) for i in x]})
        elif kind == "table":
            blocks.append({"kind": "table", "columns": [inline(c) for c in x.columns],
                           "rows": [[inline(v) for v in row] for row in x.astype(str).itertuples(index=False)]})
        elif kind == "figure":
            data = base64.b64encode((Path(figure_dir) / x[0]).read_bytes()).decode("ascii")
            blocks.append({"kind": "figure", "src": f"data:image/png;base64,{data}", "alt": x[1]})
    return _ENV.get_template("report.html").render(title=doc.title, blocks=blocks, toc=toc, toc_open=TOC_OPEN)
