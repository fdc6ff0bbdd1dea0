"""A third held-out domain for the benchmarks: the Debian Administrator's Handbook, in English.

Real English prose that is neither Python's own documentation (builtin:pydoc) nor code
(builtin:stdlib-code), and that nothing in prunetune was tuned on. It is not shipped with Python, so
this set-up installs it the way a Debian user gets it: `apt-get download debian-handbook` (the
package's .deb, no root needed to unpack it) and `dpkg-deb -x`, then the English HTML chapters are
turned into one JSON-lines record per page (`{"text": ...}`), which prunetune reads as a local file.
Its held-out split is then the last tenth of the pages, as for every local file.

    python benchmarks/handbook.py        # writes benchmarks/data/debian-handbook.jsonl, prints its spec

Other benchmarks call `handbook_spec()`, which builds the file on first use.
"""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "debian-handbook.jsonl"
PACKAGE = "debian-handbook"
ENGLISH = "usr/share/doc/debian-handbook/html/en-US"
# Navigation, tables of contents and the legal pages are not the book's prose.
SKIPPED_PAGES = ("index.html", "pr01.html", "pr02.html", "legalnotice", "ix01.html")


class _Text(html.parser.HTMLParser):
    """The visible text of one page's body (the DocBook chapter, section or appendix `div`), without
    the navigation around it or the chapter's table of contents."""

    BODY = {"chapter", "section", "preface", "appendix", "part", "colophon"}
    BLOCKS = {"p", "div", "li", "h1", "h2", "h3", "h4", "pre", "dt", "dd", "td", "th"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.depth = 0  # open tags inside the body; 0: outside it
        self.skipped = 0  # open tags inside a table of contents

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        if tag in ("br", "img", "hr", "meta", "link", "col"):
            return  # void elements have no end tag
        if self.depth:
            self.depth += 1
            self.skipped += bool(self.skipped) or "toc" in classes
        elif tag == "div" and classes & self.BODY:
            self.depth = 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("br", "img", "hr", "meta", "link", "col"):
            return
        if self.depth:
            self.depth -= 1
            self.skipped -= bool(self.skipped)
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth and not self.skipped:
            self.parts.append(data)

    def text(self) -> str:
        joined = "".join(self.parts)
        lines = (re.sub(r"\s+", " ", line).strip() for line in joined.splitlines())
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def page_text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.text()


def build(out: Path = DATA) -> Path:
    """Download the package, unpack it and write the English pages as JSON lines (in page-name order)."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        sys.exit("benchmarks/handbook.py needs apt-get and dpkg-deb (a Debian or Ubuntu machine)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        pages = sorted((Path(tmp) / "x" / ENGLISH).glob("*.html"))
        records = [{"text": text} for page in pages if not page.name.startswith(SKIPPED_PAGES)
                   if len(text := page_text(page)) > 200]
        version = deb.name.split("_")[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    partial.replace(out)
    (out.parent / "debian-handbook.version").write_text(version + "\n")
    return out


def handbook_spec() -> str:
    """The data spec of the handbook file, built on first use."""
    return str(DATA if DATA.exists() else build())


if __name__ == "__main__":
    spec = handbook_spec()
    records = [json.loads(line) for line in Path(spec).read_text(encoding="utf-8").splitlines()]
    print(f"{spec}: {len(records)} pages, {sum(len(r['text']) for r in records):,} characters")
