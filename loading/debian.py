"""Debian packages as a data source: fetched and unpacked without installing them, and the public-domain novels that
two of them ship as R data. build_corpus.py (the training corpus) and evaluation/texts.py (the BABILong haystacks)
read them.

Packages are fetched with `apt-get download` into a directory and unpacked with `dpkg -x`: nothing is installed and no
root is needed (but the package lists must be there: run `apt-get update` once if they are not).
"""
from __future__ import annotations

import re
import subprocess
import zlib
from pathlib import Path

from errors import UserError

META_PACKAGES = ("python3-doc", "linux-doc")  # they name the versioned documentation package to fetch


def fetch(package: str, into: Path) -> tuple[Path, str]:
    """Download `package` (for a documentation meta-package, the versioned package it depends on) and unpack it
    under `into`; return the unpacked tree and "name version" of what was fetched."""
    if package in META_PACKAGES:
        package = re.search(r"Depends: (\S+)", _run(["apt-cache", "depends", "--important", package], package))[1]
    _run(["apt-get", "download", package], package, cwd=into)
    deb = next(into.glob(f"{package}_*.deb"))
    _run(["dpkg", "-x", str(deb), str(into / package)], package)
    return into / package, f"{package} {deb.stem.split('_')[1]}"


def _run(cmd: list[str], package: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} is missing; run this on Debian or Ubuntu (the data comes from Debian packages).")
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"`{' '.join(cmd)}` failed for {package} ({last}); run `apt-get update` (as root) and check "
                        "that Debian's archives can be reached.")
    return done.stdout


def r_lazy_data(package_tree: Path, name: str) -> dict:
    """The objects of an R package's lazy-loaded data (data/Rdata.rdx + .rdb), read with the `rdata` package: each
    object is zlib-compressed R serialisation after a 4-byte length."""
    try:
        import rdata  # only the books need it
    except ImportError:
        raise UserError("The books are R data, read with the rdata package; `pip install rdata`.") from None

    data = next(package_tree.glob(f"usr/lib/R/site-library/{name}/data"))
    index = rdata.read_rds(data / "Rdata.rdx")
    blob = (data / "Rdata.rdb").read_bytes()
    return {str(key): rdata.conversion.convert(rdata.parser.parse_data(
            zlib.decompress(blob[offset + 4:offset + length]), extension=".rds"))
            for key, (offset, length) in index["variables"].items()}


NOVEL_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers")


def novels(trees: dict[str, Path]) -> dict[str, str]:
    """Jane Austen's six novels and Moby-Dick by name ("austen-TITLE", "melville-moby-dick"), from the unpacked trees
    of NOVEL_PACKAGES."""
    austen = r_lazy_data(trees["r-cran-janeaustenr"], "janeaustenr")
    docs = {f"austen-{title}": "\n".join(lines) for title, lines in austen.items()}
    moby = str(r_lazy_data(trees["r-cran-tokenizers"], "tokenizers")["mobydick"][0]).replace("\r\n", "\n")
    start = re.search(r"\*\*\* ?START OF.*\n", moby)  # Project Gutenberg's header and footer are cut
    end = re.search(r"\nEnd of Project Gutenberg|\n\*\*\* ?END OF", moby)
    docs["melville-moby-dick"] = moby[start.end():end.start()].strip()
    return docs
