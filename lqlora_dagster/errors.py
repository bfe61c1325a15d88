"""The one exception type users see for bad input.

Raised at the boundary (public functions) before torch or the solver can fail deep
inside with a message that names none of the user's inputs.
"""


class LQLoRAInputError(ValueError):
    """Bad input from the user: the message says what was seen and what to do."""


class RunInterrupted(Exception):
    """The user stopped a run (Ctrl-C or SIGTERM): not a failure of the run's code. What
    finished is stored; the next run picks up from there."""
