class UserError(Exception):
    """A mistake in what the user gave us (a path, a value, a prompt). Its message is one sentence that names the fix;
    the command-line tools print it and exit with status 2, without a traceback."""
