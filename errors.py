import sys


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
