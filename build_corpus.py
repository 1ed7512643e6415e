"""Build an offline corpus of long documents for the SmolLM2 8K -> 32K run, from Debian packages alone.

    python build_corpus.py [--out data/corpus]

Each source becomes a directory of UTF-8 .txt files, one document per file, which `data.DataConfig(paths=[...])`
reads as one domain each:

  books/        public-domain books, one document per book: Jane Austen's six novels (r-cran-janeaustenr, R data),
                Moby-Dick (r-cran-tokenizers, R data) and the 66 books of the King James Bible (bible-kjv-text,
                printed by the package's own `bible` program from bible-kjv)
  python-docs/  the Python documentation (python3-doc), its reStructuredText sources, one document per chapter
  linux-docs/   the Linux kernel documentation (linux-doc), its reStructuredText sources, one document per chapter;
                GPL-2.0, unlike the others: leave it out with --sources if that matters for your model

A chapter is the largest part of a manual's table of contents (a page and every page below it, in reading order) of
at most MAX_CHARS characters; consecutive small parts under one page are joined up to that size, and a longer part is
split the same way.

Packages are fetched with `apt-get download` into a temporary directory and unpacked with `dpkg -x`: nothing is
installed and no root is needed (but the package lists must be there: run `apt-get update` once if they are not).
A source whose directory exists is not built again (delete it to rebuild). STATS.md, written last, gives documents,
characters and SmolLM2 tokens per source, how many documents reach 8K and 32K tokens, and each package's licence; the
token count fills training/data.py's token cache (--cache-dir) on the way.
"""
from __future__ import annotations

import argparse
import fnmatch
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from loading import tokenizer
from loading import weights
from training.data import DataConfig, load_documents
from loading.debian import fetch, novels
from errors import UserError, run_cli

MAX_CHARS = 400_000  # a chapter of the manuals: at most this many characters (about 100K tokens)
MIN_CHARS = 1_000    # shorter documents (title and table-of-contents pages) are left out
PACKAGES = {  # source -> Debian packages
    "books": ["r-cran-janeaustenr", "r-cran-tokenizers", "bible-kjv-text", "bible-kjv"],
    "python-docs": ["python3-doc"],  # meta-packages: they name the versioned documentation package to fetch
    "linux-docs": ["linux-doc"],
}
LICENCES = {
    "r-cran-janeaustenr": "texts: public domain (Jane Austen, 1811-1817, from Project Gutenberg); package: MIT",
    "r-cran-tokenizers": "Moby-Dick: public domain (Herman Melville, 1851, from Project Gutenberg, its licence "
                         "header and footer removed); package: MIT",
    "bible-kjv-text": "King James Version (1611): public domain (in the UK, under Crown letters patent); package "
                      "data: 'users may copy, modify or distribute this file at will'",
    "bible-kjv": "GPL-2.0-or-later (the `bible` program, used only to print the text)",
    "python3-doc": "PSF License Version 2 (code examples also Zero-Clause BSD)",
    "linux-doc": "GPL-2.0 (some files GPL-2.0 OR CC-BY-4.0, as their SPDX lines say); copyleft, not permissive",
}


# ------------------------------------------------------------------------------------------------ books
def books(trees: dict[str, Path]) -> dict[str, str]:
    docs = novels(trees)
    bible = subprocess.run([str(trees["bible-kjv"] / "usr/bin/bible"), "-p", str(trees["bible-kjv-text"] / "usr/lib"),
                            "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True)
    if bible.returncode or not bible.stdout:
        raise UserError(f"The bible program of bible-kjv failed ({bible.stderr.strip()[-200:]}); install its "
                        "libraries with `apt-get install bible-kjv`, or build --sources python-docs,linux-docs.")
    parts = re.split(r"^(\S.*) 1$", bible.stdout, flags=re.M)  # a book starts at its chapter 1: "Song of Solomon 1"
    for number, (book, text) in enumerate(zip(parts[1::2], parts[2::2]), 1):
        docs[f"kjv-{number:02d}-{book.lower().replace(' ', '-')}"] = f"{book}\n\n{book} 1{text}".strip()
    return docs


# ------------------------------------------------------------------------------------------------ manuals
def chapters(sources: Path, top: str, skip: str | None = None) -> dict[str, str]:
    """Sphinx reST sources (a `_sources` directory) cut into chapters along their table of contents, from page
    `top`, leaving out pages under `skip`."""
    pages = {str(p.relative_to(sources)).removesuffix(".txt").removesuffix(".rst"): p
             for p in sorted(sources.rglob("*.txt")) if not (skip and p.relative_to(sources).parts[0] == skip)}
    text = {name: path.read_text(encoding="utf-8", errors="replace") for name, path in pages.items()}
    done: set[str] = set()
    docs = {}

    def below(page: str, seen: set[str]) -> list[str]:
        """`page` and every page under it, in reading order, each once."""
        if page in seen:
            return []
        seen.add(page)
        return [page, *(p for child in toctree(page, text[page], pages) for p in below(child, seen))]

    def size(part: list[str]) -> int:
        return sum(len(text[p]) for p in part)

    def emit(part: list[str]) -> None:
        if part:
            docs[part[0]] = "\n\n".join(text[p].strip() for p in part)

    def cut(page: str) -> None:
        """Documents from `page` and the pages below it: the whole subtree if it fits, else the page with the subtrees
        below it that fit, consecutive ones joined up to MAX_CHARS, and the others cut the same way."""
        if size(part := below(page, set(done))) <= MAX_CHARS or len(part) == 1:
            done.update(part)
            emit(part)
            return
        done.add(page)
        group = [page]
        for child in toctree(page, text[page], pages):
            if size(part := below(child, set(done))) > MAX_CHARS and len(part) > 1:
                emit(group)
                group = []
                cut(child)
                continue
            if size(group) + size(part) > MAX_CHARS:
                emit(group)
                group = []
            group += part
            done.update(part)
        emit(group)

    cut(top)
    return {name.replace("/", "-"): doc for name, doc in docs.items() if len(doc) >= MIN_CHARS}


def toctree(page: str, text: str, pages: dict) -> list[str]:
    """The pages that the `.. toctree::` directives of `page` list, in order (titles, options, external links and
    missing pages dropped; `:glob:` patterns expanded)."""
    children, indent, glob = [], None, False
    for line in text.splitlines():
        if m := re.match(r"(\s*)\.\. toctree::", line):
            indent, glob = len(m[1]), False
            continue
        if indent is None or not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= indent:  # the directive ended
            indent = None
            continue
        entry = line.strip()
        glob |= entry == ":glob:"
        target = re.sub(r"^.*<(.+)>$", r"\1", entry).removesuffix(".rst")  # "Title <page>" -> "page"
        if entry.startswith(":") or "://" in target:
            continue
        here = "" if target.startswith("/") else posixpath.dirname(page)  # "/x" is x from the top
        name = posixpath.normpath(posixpath.join(here, target.lstrip("/")))
        if glob and "*" in name:
            children += sorted(fnmatch.filter(pages, name))
        elif name in pages:
            children.append(name)
    return [c for c in children if c != page]


def python_docs(trees: dict[str, Path]) -> dict[str, str]:
    return chapters(next(trees["python3-doc"].glob("usr/share/doc/python3*/html/_sources")), "contents")


def linux_docs(trees: dict[str, Path]) -> dict[str, str]:
    return chapters(next(trees["linux-doc"].glob("usr/share/doc/linux-doc-*/html/_sources")), "index",
                    skip="translations")  # the English documentation only


BUILDERS = {"books": books, "python-docs": python_docs, "linux-docs": linux_docs}


# ------------------------------------------------------------------------------------------------ building
def build(out: Path, name: str) -> list[str]:
    """Write source `name` into out/name (through a temporary directory, so a half-built source never looks done);
    return the packages it came from, with their versions."""
    with tempfile.TemporaryDirectory() as tmp:
        fetched = {p: fetch(p, Path(tmp)) for p in PACKAGES[name]}
        docs = BUILDERS[name]({p: tree for p, (tree, _) in fetched.items()})
        partial = out / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for doc_name, text in docs.items():
            (partial / f"{doc_name}.txt").write_text(text + "\n", encoding="utf-8")
        (partial / "PACKAGES").write_text("".join(f"{p}: {version}\n" for p, (_, version) in fetched.items()))
        partial.rename(out / name)
    return [version for _, version in fetched.values()]


def stats(out: Path, names: list[str], cache_dir: str) -> str:
    """STATS.md: per source, documents, characters, SmolLM2 tokens and the length distribution; and provenance."""
    tok = tokenizer.load(weights.default_checkpoint())
    docs = load_documents(DataConfig(paths=[str(out / n) for n in names], cache_dir=cache_dir), tok)
    lines = ["# Corpus", "", "Built by `python build_corpus.py` from Debian packages; tokens are SmolLM2's "
             "(`Tokenizer.encode_ordinary`).", "",
             "| source | documents | characters | tokens | median doc (tokens) | longest doc (tokens) | docs >= 8K "
             "tokens | docs >= 32K tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    totals = np.zeros(5, np.int64)
    for name in names:
        lengths = np.array([len(d) for d in docs[name]])  # tokens per document
        chars = sum(len(p.read_text(encoding="utf-8")) for p in (out / name).glob("*.txt"))
        row = np.array([len(lengths), chars, lengths.sum(), (lengths >= 8192).sum(), (lengths >= 32768).sum()])
        totals += row
        lines.append(f"| {name} | {row[0]:,} | {row[1]:,} | {row[2]:,} | {int(np.median(lengths)):,} | "
                     f"{lengths.max():,} | {row[3]:,} | {row[4]:,} |")
    lines.append(f"| **all** | {totals[0]:,} | {totals[1]:,} | {totals[2]:,} | | | {totals[3]:,} | {totals[4]:,} |")
    lines += ["", "## Provenance and licences", ""]
    for name in names:
        for line in (out / name / "PACKAGES").read_text().splitlines():
            package, version = line.split(": ")
            lines.append(f"- {name}: Debian package `{version}`: {LICENCES[package]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/corpus"), help="where to write (default: data/corpus)")
    p.add_argument("--sources", default=",".join(BUILDERS),
                   help=f"comma-separated sources to build (default: {','.join(BUILDERS)})")
    p.add_argument("--cache-dir", default=DataConfig().cache_dir, help="training/data.py's token cache (for STATS.md)")
    args = p.parse_args(argv)
    names = args.sources.split(",")
    if unknown := set(names) - set(BUILDERS):
        raise UserError(f"Unknown sources {sorted(unknown)}; choose from {', '.join(BUILDERS)}.")
    for name in names:
        if (args.out / name).is_dir():
            print(f"{name}: {args.out / name} exists, skipped (delete it to rebuild)", file=sys.stderr)
        else:
            print(f"{name}: from {', '.join(build(args.out, name))}", file=sys.stderr)
    report = stats(args.out, names, args.cache_dir)
    (args.out / "STATS.md").write_text(report)
    print(report)


if __name__ == "__main__":
    run_cli(main)
