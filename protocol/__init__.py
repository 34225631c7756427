"""The contract between fedmq agents and the coordinator: topics, messages, codecs, model spec.

Also the broker connection settings and the layered configuration both sides share,
so that neither side has to import the other.
"""

from protocol.errors import ProtocolError

from protocol.messages import FORMAT_VERSION

__all__ = ["FORMAT_VERSION", "ProtocolError"]
