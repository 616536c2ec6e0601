"""The method's specification lives in the repository (docs/method.md), and every citation of it resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITING = ["src", "components", "pipelines", "bench", "tests", "docs", "README.md"]
SUFFIXES = {".py", ".md"}


def citing_files() -> list[Path]:
    files = []
    for name in CITING:
        path = ROOT / name
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in SUFFIXES]
    return files


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_method_md_anchor_cited_is_a_section_of_it():
    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs/method.md").read_text(), flags=re.M)
    anchors = {github_anchor(h) for h in headings}
    cited = {(f.relative_to(ROOT), anchor) for f in citing_files()
             for anchor in re.findall(r"method\.md#([\w-]+)", f.read_text(errors="replace"))}
    assert cited, "nothing cites docs/method.md by section"
    missing = sorted(f"{f}: #{anchor}" for f, anchor in cited if anchor not in anchors)
    assert not missing, f"citations of sections docs/method.md does not have: {missing}"


def test_nothing_cites_a_spec_outside_the_repository():
    outside = "JEST" + ".md"  # spelled in two parts so that this file does not cite it itself
    citing = sorted(str(f.relative_to(ROOT)) for f in citing_files() if outside in f.read_text(errors="replace"))
    assert not citing, f"{citing} cite {outside}, which is not in the repository: cite docs/method.md"
