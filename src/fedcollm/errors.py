"""The one exception type users see: its message is a single line naming the problem."""


class FedCoLLMError(Exception):
    """A user-facing error (bad config, missing file, malformed data line, ...).

    The CLI prints it as one line and exits non-zero; anything else is a bug and keeps its
    traceback.
    """
