"""One model of a report, rendered to Markdown and to a self-contained HTML page.

Text blocks use a little inline Markdown of our own (``code``, **bold**,
*italic*). Everything a user controls (titles, labels, init names, option
values, anything read back from a run directory) goes in through
:func:`lit` (plain text) or :func:`lit_code` (shown as code): each renderer
escapes such a span for its own format, so nothing from the user can become
markup, break a table or close a code fence, in Markdown or in HTML.

>>> doc = Document(lit("a|b <img src=x>"))
>>> to_markdown(doc).splitlines()[0]
'# a\\\\|b &lt;img src=x&gt;'
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

_ENV = Environment(loader=PackageLoader("varprop.report", "templates"), autoescape=select_autoescape(["html"]))

# A literal span is text between two control characters that never occur in it: visible() writes every
# control character of a user's string as an escape (a newline as the two characters \n).
_LIT, _LIT_END, _CODE, _CODE_END = "\x02", "\x03", "\x04", "\x05"
_SPAN = re.compile(f"{_LIT}([^{_LIT_END}]*){_LIT_END}|{_CODE}([^{_CODE_END}]*){_CODE_END}")


def visible(text: Any) -> str:
    """``text`` on one line, every unprintable character (newline, tab, escape
    sequences, bidi controls) written as its Python escape.

    >>> visible("x\\ny\\x1b[2J")
    'x\\\\ny\\\\x1b[2J'
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def lit(text: Any) -> str:
    """A user's string, to be shown as plain text whatever it holds."""
    return f"{_LIT}{visible(text)}{_LIT_END}"


def lit_code(text: Any) -> str:
    """A user's string, to be shown as inline code whatever it holds."""
    return f"{_CODE}{visible(text)}{_CODE_END}"


def plain(text: str) -> str:
    """``text`` with its literal spans unwrapped (for contexts that are text only: a page title, alt text)."""
    return _SPAN.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), str(text))


def terminal(text: str) -> str:
    """``text`` as a terminal line: a user's names that the report shows as code in quotes (a Sequential's
    module "4" is no number), other literal spans unwrapped, no bold."""
    return _SPAN.sub(lambda m: m.group(1) if m.group(1) is not None else f"'{m.group(2)}'", str(text)).replace(
        "**", "")


# An item of a list: a line, or a line with sub-items under it.
Item = Union[str, tuple[str, Sequence[str]]]


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
        """A code block; its text is shown as it is (no markup, no spans)."""
        self.blocks.append(("code", plain(text)))

    def items(self, items: Sequence[Item]) -> None:
        """A bulleted list; an item ``(line, [sub-items])`` nests its sub-items under the line."""
        self.blocks.append(("list", list(items)))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def figure(self, file: str, alt: str) -> None:
        self.blocks.append(("figure", (file, alt)))


# Characters with a meaning in Markdown text (CommonMark and GitHub's extensions: tables, strikethrough,
# math), written with a backslash; &, < and > as entities, which every Markdown renderer decodes.
_MD_PUNCT = set("\\`*[]|#~$_")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _md_text(s: str) -> str:
    """A literal span as Markdown text: nothing in it can open a link, an emphasis, a code span, an HTML tag
    or a table cell. An underscore inside a word (``fan_in``) cannot emphasise and stays as it is."""
    out = []
    for i, c in enumerate(s):
        if c in _ENTITIES:
            out.append(_ENTITIES[c])
        elif c == "_" and 0 < i < len(s) - 1 and s[i - 1].isalnum() and s[i + 1].isalnum():
            out.append(c)
        elif c in _MD_PUNCT:
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def _md_code(s: str, in_table: bool) -> str:
    """A literal span as a Markdown code span, delimited by a backtick run longer than any inside it."""
    if not s:
        return ""
    if in_table:  # GitHub's tables split cells on unescaped pipes first, code spans included
        s = s.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall("`+", s)), default=0) + 1)
    pad = " " if s[0] == "`" or s[-1] == "`" else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _md(text: Any, in_table: bool = False) -> str:
    """Our markup as it is, the literal spans escaped for Markdown."""
    return _SPAN.sub(lambda m: _md_text(m.group(1)) if m.group(1) is not None else _md_code(m.group(2), in_table),
                     str(text))


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text`` (at least 3), so the text cannot close it."""
    return "`" * max(3, max((len(r) for r in re.findall("`+", text)), default=0) + 1)


def to_markdown(doc: Document) -> str:
    out = [f"# {_md(doc.title)}", ""]
    for kind, x in doc.blocks:
        if kind == "h2":
            out += [f"## {_md(x)}", ""]
        elif kind == "h3":
            out += [f"### {_md(x)}", ""]
        elif kind == "p":
            out += [_md(x), ""]
        elif kind == "code":
            fence = _fence(x)
            out += [fence, x, fence, ""]
        elif kind == "list":
            for item in x:
                line, subs = (item, ()) if isinstance(item, str) else item
                out += [f"- {_md(line)}"] + [f"  - {_md(sub)}" for sub in subs]
            out += [""]
        elif kind == "table":
            cells = x.astype(str).map(lambda v: _md(v, in_table=True))
            cells.columns = [_md(c, in_table=True) for c in x.columns]
            out += [cells.to_markdown(index=False, disable_numparse=True), ""]
        elif kind == "figure":
            out += [f"![{_md(x[1])}]({x[0]})", ""]
    return "\n".join(out)


def inline(text: str) -> str:
    """Escape, then turn `code`, **bold** and *italic* into HTML; literal spans are escaped text only.

    >>> inline("a <b> `x<y` **no**")
    'a &lt;b&gt; <code>x&lt;y</code> <strong>no</strong>'
    >>> inline("**" + lit("**x** <i>") + "**")
    '<strong>**x** &lt;i&gt;</strong>'
    """
    spans: list[str] = []

    def hold(m: re.Match[str]) -> str:  # a placeholder no formatting rule can touch
        spans.append(html.escape(m.group(1)) if m.group(1) is not None else f"<code>{html.escape(m.group(2))}</code>")
        return f"{_LIT}{len(spans) - 1}{_LIT_END}"

    parts = re.split(r"(`[^`]*`)", _SPAN.sub(hold, str(text)))
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)
        out.append(s)
    return re.sub(f"{_LIT}(\\d+){_LIT_END}", lambda m: spans[int(m.group(1))], "".join(out))


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
            anchor = _slug(plain(x), seen)
            entry = {"anchor": anchor, "text": plain(x), "children": []}
            (toc[-1]["children"] if kind == "h3" and toc else toc).append(entry)
            blocks.append({"kind": kind, "anchor": anchor, "html": inline(x)})
        elif kind == "p":
            blocks.append({"kind": "p", "html": inline(x)})
        elif kind == "code":
            blocks.append({"kind": "code", "text": x})
        elif kind == "list":
            entries = [(item, ()) if isinstance(item, str) else item for item in x]
            blocks.append({"kind": "list", "entries": [{"html": inline(line), "children": [inline(s) for s in subs]}
                                                       for line, subs in entries]})
        elif kind == "table":
            blocks.append({"kind": "table", "columns": [inline(c) for c in x.columns],
                           "rows": [[inline(v) for v in row] for row in x.astype(str).itertuples(index=False)]})
        elif kind == "figure":
            data = base64.b64encode((Path(figure_dir) / x[0]).read_bytes()).decode("ascii")
            blocks.append({"kind": "figure", "src": f"data:image/png;base64,{data}", "alt": plain(x[1])})
    return _ENV.get_template("report.html").render(title=plain(doc.title), blocks=blocks, toc=toc,
                                                   toc_open=TOC_OPEN)


def write(doc: Document, directory: Path, formats: Sequence[str] = ("md", "html")) -> dict[str, Path]:
    """``doc`` as report.md and/or report.html in ``directory`` (figures read from there);
    their paths, ``"report"`` being the Markdown one when written, else the HTML."""
    directory, paths = Path(directory), {}
    if "md" in formats:
        paths["report"] = directory / "report.md"
        paths["report"].write_text(to_markdown(doc))
    if "html" in formats:
        paths["html"] = directory / "report.html"
        paths["html"].write_text(to_html(doc, directory))
        paths.setdefault("report", paths["html"])
    return paths
