"""The one exception type users see for bad input.

Raised at the boundary (public functions) before torch or the solver can fail deep
inside with a message that names none of the user's inputs.
"""


class LQLoRAInputError(ValueError):
    """Bad input from the user: the message says what was seen and what to do."""
