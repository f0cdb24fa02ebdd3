"""Every citation of the record notes ("docs/records/record-stack.md §4.2", "docs/records/hedge-stack.md
§1.4", "Appendix B of record-stack.md", and the same without the docs/records/ prefix) names a section that exists in
docs/records/, and nothing in the code, tests, notebooks or docs points at a document outside the
repository. A section number without a document cites the one named last before it in the same
file; inside the notes themselves a named document holds for its line only."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "records"
SCANNED = ["pgolf", "tests", "notebooks", "docs", "README.md"]
SUFFIXES = {".py", ".md", ".ipynb"}
# tests/fixtures holds data; its README records where the data came from (outside, by nature).
# This file's own examples are made up to exercise the parser.
EXCLUDED = [ROOT / "tests" / "fixtures", Path(__file__).resolve()]

SEC = r"[0-9A-Z]+(?:\.[0-9]+)*"
NAME = r"(?:docs/records/)?(?P<{}>record-stack|hedge-stack)(?:\.md)?"
TOKEN = re.compile(
    rf"Appendix (?P<app>[A-Z](?:\.[0-9]+)?)(?:\s+of\s+{NAME.format('of')})?"
    rf"|{NAME.format('doc')}"
    rf"|§\s*(?P<sec>{SEC})(?:\s*[-–]\s*§?\s*(?P<end>{SEC}))?")
HEADING = re.compile(rf"^#{{2,4}}\s+(?:Appendix\s+)?(?P<sec>{SEC})[.\s]", re.M)
OUTSIDE = re.compile(r"\.\./shared\b|/work/\w+")


def sections(name: str) -> set[str]:
    return {m["sec"] for m in HEADING.finditer((RECORDS / f"{name}.md").read_text())}


def scanned_files() -> list[Path]:
    out = []
    for entry in SCANNED:
        path = ROOT / entry
        for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if f.suffix in SUFFIXES and f.is_file() and not any(ex == f or ex in f.parents for ex in EXCLUDED):
                out.append(f)
    return out


def text_of(path: Path) -> str:
    if path.suffix == ".ipynb":  # the cells' text, not the JSON escaping of it
        return "\n".join("".join(c.get("source", "")) for c in json.loads(path.read_text())["cells"])
    text = path.read_text()
    if path.suffix == ".md":  # a heading names a section, it does not cite one (line count kept)
        text = re.sub(r"^#.*$", "", text, flags=re.M)
    return text


def citations(text: str, default: str | None):
    """(document, section, line) for every cited section; document None when nothing named one.
    With a `default` (the notes themselves) a named document holds until the end of its line."""
    current, current_line = default, 0
    for m in TOKEN.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if default and line != current_line:
            current = default
        current_line = line
        if m["app"]:
            current = m["of"] or current
            yield current, m["app"], line
        elif m["sec"]:
            for sec in filter(None, (m["sec"], m["end"])):
                yield current, sec, line
        else:
            current = m["doc"]


def test_the_record_notes_have_the_numbered_sections():
    rec, hedge = sections("record-stack"), sections("hedge-stack")
    assert {"0", "1.4", "2.11", "3.10", "4.7", "5.9", "6.8", "7", "7.17", "A", "A.6", "B"} <= rec
    assert {"0", "1.5", "2", "3", "4.4", "5.7", "6.2", "7.5", "8"} <= hedge


def test_every_citation_names_an_existing_section():
    known = {name: sections(name) for name in ("record-stack", "hedge-stack")}
    bad, count = [], 0
    for f in scanned_files():
        default = f.stem if f.parent == RECORDS and f.stem in known else None
        for doc, sec, line in citations(text_of(f), default):
            count += 1
            where = f"{f.relative_to(ROOT)}:{line}"
            if doc is None:
                bad.append(f"{where}: §{sec} without a document named before it")
            elif sec not in known[doc]:
                bad.append(f"{where}: {doc}.md has no section {sec}")
    assert not bad, "\n".join(bad)
    assert count > 60  # the scan really sees the code's citations


def test_nothing_points_outside_the_repository():
    bad = [f"{f.relative_to(ROOT)}:{text_of(f).count(chr(10), 0, m.start()) + 1}: {m[0]}"
           for f in scanned_files() for m in OUTSIDE.finditer(text_of(f))]
    assert not bad, "\n".join(bad)


def test_the_parser_reads_ranges_prefixes_appendices_and_bare_sections():
    text = ("see docs/records/record-stack.md §3.3-3.4 and §4.1-§4.6; docs/records/hedge-stack.md §1-4, §5.6.\n"
            "Appendix A of record-stack.md; (§7.9)")
    assert list(citations(text, None)) == [
        ("record-stack", "3.3", 1), ("record-stack", "3.4", 1), ("record-stack", "4.1", 1),
        ("record-stack", "4.6", 1), ("hedge-stack", "1", 1), ("hedge-stack", "4", 1),
        ("hedge-stack", "5.6", 1), ("record-stack", "A", 2), ("record-stack", "7.9", 2)]
    assert list(citations("a stray §2.1", None)) == [(None, "2.1", 1)]
    # inside a note, another note named on one line does not carry over to the next
    assert list(citations("docs/records/hedge-stack.md §6.2, §5\n§4.7", "record-stack")) == [
        ("hedge-stack", "6.2", 1), ("hedge-stack", "5", 1), ("record-stack", "4.7", 2)]
