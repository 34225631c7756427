"""The one typed error every decoder in fedmq raises for bad input."""


class ProtocolError(ValueError):
    """A message or payload that does not follow the fedmq protocol.

    `reason` is a short stable code (``decode``, ``schema``, ``shape``, ``non_finite``,
    ``oversize``, ``codec``, ``format``, ``fleet``) that the coordinator counts rejections
    under; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
