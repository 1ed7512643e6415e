"""The README's Python example runs as written, from another folder, and pyproject.toml installs every module."""
import os
import re
import subprocess
import sys
import tomllib

from conftest import ROOT


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_python_example_runs_from_another_folder(tmp_path, smollm2_gguf):
    """Run from outside the checkout, with the modules found as `pip install -e .` finds them (on the path, not in the
    working folder): load, convert, generate and stream."""
    [example] = readme_blocks("python")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    first, layout, streamed = done.stdout.splitlines()[:3]
    assert first.startswith("[' Paris") and layout == "10 full layers of 30" and "Paris" in streamed


def test_pyproject_lists_every_module():
    """A module missing from py-modules, or a folder from packages, would not be importable after `pip install -e .`
    from another folder."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = project["tool"]["setuptools"]
    modules = sorted(p.stem for p in ROOT.glob("*.py"))
    folders = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert sorted(listed["py-modules"]) == modules, "update py-modules in pyproject.toml"
    assert sorted(listed["packages"]) == folders, "update packages in pyproject.toml"
    data = [ROOT / folder / name for folder, names in listed["package-data"].items() for name in names]
    assert data and all(path.exists() for path in data)


def test_pyproject_dependencies_agree_with_requirements():
    """Every dependency pyproject.toml declares is pinned the same way in requirements.txt (what CI installs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()
            pins[name] = requirement.replace(" ", "")
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()
        assert pins.get(name) == requirement, f"{requirement} vs requirements.txt's {pins.get(name)}"
