"""The README and the results pages hold together: every relative link leads to a file, and every number in the
README's table of findings stands on a page that row links to (the README holds no number a page does not)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w.])")


def relative_links(text):
    return [link.split("#")[0] for link in LINK.findall(text)
            if not re.match(r"[a-z]+://", link) and not link.startswith("#")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file(doc):
    missing = [link for link in relative_links(doc.read_text()) if not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


def findings_rows(readme):
    """The rows of the README's findings table: (finding, numbers, pages), pages as paths."""
    rows = []
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("finding", "---"):
            rows.append((cells[0], cells[1], [readme.parent / link for link in relative_links(cells[2])]))
    return rows


def absent_numbers(finding, numbers, pages):
    """The numbers a findings row quotes that none of its pages holds."""
    on_pages = set(NUMBER.findall(" ".join(page.read_text() for page in pages)))
    return [n for n in NUMBER.findall(finding + " " + numbers) if n not in on_pages]


def test_every_number_of_a_finding_stands_on_a_page_it_links():
    rows = findings_rows(ROOT / "README.md")
    assert rows, "the README's findings table (finding | numbers | page) is missing"
    for finding, numbers, pages in rows:
        assert pages, f"the finding {finding!r} links no page"
        assert not absent_numbers(finding, numbers, pages), \
            f"the finding {finding!r} quotes numbers its pages do not hold: {absent_numbers(finding, numbers, pages)}"


def test_the_number_check_catches_a_number_no_page_holds(tmp_path):
    (tmp_path / "page.md").write_text("| robust | 0.64 +- 0.03 |\n")
    (tmp_path / "README.md").write_text("| finding | numbers | page |\n| --- | --- | --- |\n"
                                        "| robust protects | 0.64 +- 0.03, 0.57 | [page](page.md) |\n")
    [row] = findings_rows(tmp_path / "README.md")
    assert absent_numbers(*row) == ["0.57"]
