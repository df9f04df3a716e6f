"""The one exception type users see: a single clear line, printed without a traceback by the CLI."""


class UserError(Exception):
    """Bad input or an impossible request. The message names the file or field and what to do."""
