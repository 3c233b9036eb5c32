"""Engine errors that callers (the server, LLM users) tell apart."""


class EngineDeadError(RuntimeError):
    """The engine loop crashed or stopped; pending and new requests fail with this."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
