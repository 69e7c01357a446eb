"""Domain errors. Every layer raises these; the edges (CLI, Triton, gRPC) map them to codes."""

from __future__ import annotations


class DGemmaError(Exception):
    """Base of every error the service raises on purpose. `message` is safe to show a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DGemmaError):
    """A request field is invalid. `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def renamed(self, field: str) -> "InvalidArgument":
        """The same error under the name the caller's interface uses for the field."""
        return InvalidArgument(field, self.detail)


class UnknownModel(InvalidArgument):
    """A request names a model this server does not serve."""


class PayloadTooLarge(InvalidArgument):
    """A request body is larger than the server accepts."""


class CheckpointError(DGemmaError):
    """A checkpoint directory is missing, malformed or of another architecture."""


class Overloaded(DGemmaError):
    """The engine's admission budget and queue are full."""


class Cancelled(DGemmaError):
    """The request was cancelled by its client."""


class DeadlineExceeded(DGemmaError):
    """The request's deadline passed before it finished."""


class Unavailable(DGemmaError):
    """The engine is not ready or is shutting down."""


class Unauthenticated(DGemmaError):
    """The call carries no valid credentials."""
