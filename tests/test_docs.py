"""The docs point somewhere: every `NAME.md` a file mentions and every relative Markdown link exists in the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = [p.parent for p in ROOT.glob("*/__init__.py")]  # the support code: evaluation/, loading/, ...
TEXT = [*ROOT.glob("*.py"), *(p for folder in FOLDERS for p in folder.glob("*.py")), *ROOT.glob("*.md"),
        *ROOT.glob("docs/*.md"), *ROOT.glob("configs/*.yaml"), *ROOT.glob("tests/*.py")]
MD_NAME = re.compile(r"\b([\w./-]*[A-Z][A-Z_]*\.md)\b")  # EVALUATION.md, docs/CORPUS.md
WRITTEN_BY_US = {"STATS.md"}  # build_corpus.py writes it into the corpus it builds
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](path) or [text](path#anchor)


def _exists(name: str, here: Path) -> bool:
    return Path(name).name in WRITTEN_BY_US or (here.parent / name).exists() or (ROOT / name).exists()


def test_every_md_file_named_exists():
    missing = [f"{p.relative_to(ROOT)}: {m}" for p in TEXT if p.name != "test_docs.py"
               for m in MD_NAME.findall(p.read_text()) if not _exists(m, p)]
    assert not missing, f"references to files not in the repository: {missing}"


def test_every_relative_markdown_link_exists():
    missing = [f"{p.relative_to(ROOT)}: {m}" for p in TEXT if p.suffix == ".md"
               for m in LINK.findall(p.read_text()) if "://" not in m and not _exists(m, p)]
    assert not missing, f"links to files not in the repository: {missing}"


def test_readme_has_licence_and_citation():
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "LICENSE").exists() and "](LICENSE)" in readme
    assert "arxiv.org/abs/2410.01485" in readme and "@inproceedings" in readme
