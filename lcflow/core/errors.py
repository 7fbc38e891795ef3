"""The error every layer raises for a mistake the user can fix, so `lcflow` can tell it from a bug."""


class UsageError(Exception):
    """A mistake the user can fix (a missing file, an unknown name, a bad setting): `lcflow` prints
    its message as one line and exits 2, without a traceback unless --debug is given."""
