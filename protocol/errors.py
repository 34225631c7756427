"""The one typed error every decoder in fedmq raises for bad input."""


MAX_MESSAGE = 300  # characters of what a refusal says: one line of a log, not a copy of the payload


class ProtocolError(ValueError):
    """A message or payload that does not follow the fedmq protocol.

    `reason` is a short stable code (``decode``, ``schema``, ``shape``, ``non_finite``,
    ``oversize``, ``codec``, ``format``, ``fleet``; ``limits``: beyond what the reader accepts, see
    messages.decode_model's check_spec) that the coordinator counts rejections under; the message
    says what exactly was wrong, in at most MAX_MESSAGE characters.
    """

    def __init__(self, reason: str, message: str) -> None:
        if len(message) > MAX_MESSAGE:  # it may quote what was sent (a list of 60 KB as a hyperparameter)
            message = message[:MAX_MESSAGE - 3] + "..."
        super().__init__(f"{reason}: {message}")
        self.reason = reason
