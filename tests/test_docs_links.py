"""The documentation's own cross-references resolve: every relative Markdown link (inline, image or
reference-style) in README.md, docs/*.md, data/README.md and sweeps/README.md names an existing file
(the ``#anchor`` part is not checked, http(s) and mailto links are skipped), and every backticked
``docs/<name>.md`` in them exists; docs/architecture.md's layer diagram is exactly .importlinter's layers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "data" / "README.md",
               ROOT / "sweeps" / "README.md"])

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)          # fenced code blocks
_CODE = re.compile(r"`[^`\n]*`")                                  # inline code spans
_INLINE = re.compile(r"!?\[[^\]\n]*\]\(\s*(?:<([^>\n]*)>|([^)\s]*))(?:\s+[\"'(][^)]*)?\)")
_REFDEF = re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*<?([^\s>]+)>?", re.M)
_DOCS_REF = re.compile(r"`(docs/[\w.-]+\.md)\b")


def relative_links(text: str) -> list[str]:
    """The link targets of ``text`` that are local paths (anchors stripped), outside code."""
    prose = _CODE.sub("", _FENCE.sub("", text))
    targets = [bracketed or bare for bracketed, bare in _INLINE.findall(prose)] + _REFDEF.findall(prose)
    out = []
    for target in targets:
        path = target.split("#", 1)[0]
        if path and not re.match(r"(https?|mailto):", path, re.I):
            out.append(path)
    return out


def test_the_link_parser_finds_local_links_only():
    text = ("See [a](docs/a.md#part), ![pic](img/p.png \"title\") and [b](<../b c.md>).\n"
            "[web](https://example.org/x.md) [top](#intro) [mail](mailto:x@y.z)\n"
            "`[not](code.md)`\n```\n[neither](fenced.md)\n```\n[ref]: data/README.md\n")
    assert relative_links(text) == ["docs/a.md", "img/p.png", "../b c.md", "data/README.md"]


def test_every_listed_document_exists():
    assert len(DOCS) >= 4 and all(p.is_file() for p in DOCS), DOCS


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    missing = [link for link in relative_links(doc.read_text()) if not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)}: broken links {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_docs_references_exist(doc):
    missing = [ref for ref in _DOCS_REF.findall(doc.read_text()) if not (ROOT / ref).is_file()]
    assert not missing, f"{doc.relative_to(ROOT)}: references to missing files {missing}"


def _importlinter_layers() -> list[list[str]]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    lines = parser["importlinter:contract:layers"]["layers"].strip().splitlines()
    return [line.split() for line in lines]


def _architecture_layers(text: str) -> list[list[str]]:
    """The layer diagram of docs/architecture.md: the indented block under "## Layers", one layer per labelled
    line (continuation lines start with ':' or '|'), parenthesised notes and '|' connector lines dropped."""
    block = text[text.index("\n## Layers\n"):]
    section_text = block[:block.find("\n## ", 1)]
    layers: list[list[str]] = []
    for line in section_text.splitlines():
        if not line.startswith("    ") or not line.strip() or line.strip() == "|":
            continue
        body = re.sub(r"\(.*?\)", "", line).split()
        if body[0] not in (":", "|"):          # a labelled line ("entry points  comol.main : ...") opens a layer
            layers.append([])
            while body and not body[0].startswith("comol."):
                body = body[1:]
        layers[-1] += body
    return layers


def test_architecture_page_draws_the_enforced_layers():
    """docs/architecture.md's diagram lists exactly .importlinter's layers, in order, with the same separators."""
    assert _architecture_layers((ROOT / "docs" / "architecture.md").read_text()) == _importlinter_layers()


def test_architecture_parser_sees_a_changed_layer():
    text = "\n## Layers\n\n    top layer   comol.a : comol.b\n        |\n    low   comol.c | comol.d   (note)\n\n## Next\n"
    assert _architecture_layers(text) == [["comol.a", ":", "comol.b"], ["comol.c", "|", "comol.d"]]
    assert _architecture_layers(text.replace("comol.b", "comol.x")) != [["comol.a", ":", "comol.b"],
                                                                        ["comol.c", "|", "comol.d"]]
