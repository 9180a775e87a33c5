"""The one exception type for user-facing problems.

An :class:`EmscopeError` carries a single line that names the file, line or module at fault.
The command line prints it without a traceback; library users can catch it.
"""


class EmscopeError(Exception):
    """A problem with the user's input (a file, a config, a model) rather than a bug."""
