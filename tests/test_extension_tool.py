"""tools/extension.py's checks, which must answer before any training starts (its runs are GPU work; `--smoke` is
its CPU dry run, minutes long, so not part of the suite)."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("args, message", [
    (["--arms", "nope"], "unknown arm 'nope'"),
    (["--speed", "3", "--arms", "full"], "--speed 3 leaves no step after the first 5"),
    (["--samples", "0", "--arms", "full"], "--samples 0: give 1 or more"),
])
def test_mistakes_are_one_line_before_anything_runs(tmp_path, args, message):
    runs = tmp_path / "runs"
    out = subprocess.run([sys.executable, "tools/extension.py", "--runs", str(runs), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert not runs.exists()
