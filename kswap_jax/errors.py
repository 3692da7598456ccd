"""The one exception type for bad user input (configs, data, checkpoints)."""


class UserError(ValueError):
  """A problem the user can fix; the CLI prints it as one line and exits 2."""
