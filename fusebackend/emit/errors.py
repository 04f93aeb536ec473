"""The emitters' one error type: a group they cannot turn into a kernel (it then runs as ATen calls)."""


class EmitError(Exception):
    """The group cannot be expressed as a kernel; the runtime runs it as ATen calls instead."""
