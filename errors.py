"""A user's mistake as one sentence that names the fix: `UserError`, how the command-line tools print it (`run_cli`),
reading a JSON file a user hands us (`read_json`), whose every failure is such a sentence, and writing a file whole or
not at all (`write_atomic`), so that a stopped run leaves no half-written result behind."""
import json
import os
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave us (a path, a value, a prompt). Its message is one sentence that names the fix;
    the command-line tools print it and exit with status 2, without a traceback."""


def run_cli(main) -> None:
    """Run a command-line tool's main(): a UserError becomes its one sentence and exit status 2, ctrl-c status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def read_json(path: Path) -> dict:
    """The JSON object in `path` (a checkpoint's or tokenizer's settings), or a UserError saying what to restore."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the checkpoint directory is incomplete.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); restore or re-download "
                        "it.") from None
    except OSError as e:
        raise UserError(f"Could not read {path} ({e.strerror}); check that it is a readable file.") from None


def write_atomic(path, data) -> None:
    """Write a file whole or not at all: into a temporary sibling, renamed into place (the folder is made if needed).
    `data` is str, bytes, or a function that writes to the open binary file (np.savez, a figure's savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        try:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
