"""User-facing errors: one clear sentence saying what is wrong and what to do, never PHI."""


class InputError(ValueError):
    """Bad input from the user: the message is shown as it is, without a traceback.

    Messages must not contain PHI (patient names, IDs, dates) or full paths of inputs that may
    carry PHI in their names; callers pass only what is needed to act.
    """


class TransientError(InputError):
    """An input problem that may pass by itself (a server down or busy): worth trying again later. Every other
    ``InputError`` is about the input itself and gives the same answer every time."""
