"""Every string a user controls reaches report.md as text: rendered by a
CommonMark viewer that allows HTML (GitHub's table and strikethrough
extensions on), nothing from the user becomes a tag, a link, emphasis or a
table cell, and no title closes the fence around the command. report.html
keeps its own escaping. Through the real CLI: --title, a user init whose
module and function names are hostile, and the labels made from them."""

import json
import re
import subprocess
import sys
import textwrap
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from markdown_it import MarkdownIt

from varprop.cli import main
from varprop.report.document import Document, lit, lit_code, to_markdown

HOSTILE = ["<img src=x onerror=alert(1)>", "a|b", "x\ny", "```", "[link](javascript:alert(1))", "**bold**",
           "_u_", "$\\frac{x$", "&lt;", "\\", "`code`", "~~s~~", "# h", "\x1b[2J", "\u202e"]
TITLE = " ".join(HOSTILE)
FUNCTION = "fn<img src=x onerror=alert(2)>|```\n[l](javascript:alert(3))$\\frac{"
MODULE = "evil<svg onload=alert(4)>"  # a file name: no slash
OUR_FILES = {"std_per_layer.png", "means_per_layer.png", "correlation_per_layer.png", "histograms.png"}
TAGS = {"h1", "h2", "h3", "p", "pre", "code", "ul", "li", "strong", "em", "table", "thead", "tbody", "tr", "th",
        "td", "img", "a", "sub"}


class Tags(HTMLParser):
    """Every start tag and its attributes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def render(markdown: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(markdown)


def tags_of(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    return parser.tags


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile")
    (home / f"{MODULE}.py").write_text(textwrap.dedent(f"""
        import numpy as np

        def init(rng, fan_in, fan_out):
            return rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)

        globals()[{FUNCTION!r}] = init
    """))
    out = home / "run"
    old_path = list(sys.path)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        result = CliRunner().invoke(main, ["simulate", "--layers", "3", "--width", "8", "--samples", "16",
                                           "--init", f"{MODULE}:{FUNCTION}", "--init", "fan_in",
                                           "--replicates", "2", "--title", TITLE, "--out", str(out)])
    sys.path[:] = old_path
    sys.modules.pop(MODULE, None)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_markdown_renders_user_strings_as_text(hostile_run):
    out, _ = hostile_run
    markdown = (out / "report.md").read_text()
    html = render(markdown)
    tags = tags_of(html)
    assert {tag for tag, _ in tags} <= TAGS
    for tag, attrs in tags:  # the only images and links are the figures beside the report
        if tag == "img":
            assert attrs["src"] in OUR_FILES
        if tag == "a":
            assert attrs["href"] in OUR_FILES
    assert "javascript:" not in "".join(str(a) for _, attrs in tags for a in attrs.values())
    # The heading is the title, as text (control characters as visible escapes).
    heading = re.search(r"<h1>(.*?)</h1>", html, re.S).group(1)
    assert heading.count("&lt;img src=x onerror=alert(1)&gt;") == 1 and "x\\ny" in heading
    assert "**bold**" in heading and "_u_" in heading and "`code`" in heading and "\\x1b[2J" in heading


def _words(command: str) -> list[str]:
    """The arguments bash reads in ``command``."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, check=True)
    return out.stdout.decode().split("\0")[:-1]


def test_the_command_stays_inside_its_fence(hostile_run):
    """A title holding ``` closed the fence around the reproduce command, and what followed was markup. The
    block holds the whole command, on one line, its control characters in ANSI-C quoting (a raw escape
    sequence would act on the terminal of whoever prints report.md): bash reads the same arguments."""
    out, _ = hostile_run
    command = json.loads((out / "config.json").read_text())["command"]
    markdown = (out / "report.md").read_text()
    assert "\x1b" not in markdown and "\u202e" not in markdown
    blocks = re.findall(r"<pre><code>(.*?)</code></pre>", render(markdown), re.S)
    unescape = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&amp;": "&"}
    shown = re.sub("|".join(unescape), lambda m: unescape[m.group(0)], blocks[0]).rstrip("\n")
    assert "\n" not in shown and _words(shown) == _words(command)


def test_tables_keep_their_shape(hostile_run):
    """A pipe or newline in a label split its row into more cells or rows."""
    out, _ = hostile_run
    html = render((out / "report.md").read_text())
    for table in re.findall(r"<table>(.*?)</table>", html, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
        cells = [len(re.findall(r"<t[hd][ >]", row)) for row in rows]
        assert len(set(cells)) == 1, cells
    # The user init's label reads as it is, in the Compared table and as a per-layer heading.
    label = f"{MODULE}:{FUNCTION}".replace("\n", "\\n")
    escaped = label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert f"<td style=\"text-align:left\">{escaped}</td>" in html and f"<h3>{escaped}</h3>" in html


def test_html_and_terminal_stay_escaped(hostile_run):
    out, output = hostile_run
    page = (out / "report.html").read_text()
    assert "default-src 'none'" in page and "<img src=x" not in page and "<svg onload" not in page
    assert "&lt;svg onload=alert(4)&gt;" in page
    assert "\x1b" not in output and "\x1b" not in page  # no terminal escape sequence reaches a screen


@pytest.mark.parametrize("text", HOSTILE + [TITLE])
def test_each_hostile_string_renders_as_itself(text):
    """lit() in a paragraph, a table cell and a code span renders to exactly the text (newlines and other
    control characters as their visible escapes), and nothing else."""
    import pandas as pd

    from varprop.report.document import visible

    doc = Document("t")
    doc.p("before " + lit(text) + " after")
    doc.table(pd.DataFrame({"a": [lit(text)], "b": [lit_code(text)]}))
    html = render(to_markdown(doc))
    assert {tag for tag, _ in tags_of(html)} <= {"h1", "p", "table", "thead", "tbody", "tr", "th", "td", "code"}
    shown = visible(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert f"<p>before {shown} after</p>" in html
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html, re.S)
    assert cells[0] == shown and cells[1] == f"<code>{shown}</code>"
