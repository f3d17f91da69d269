"""Typed errors a user can cause. The server maps each to an HTTP status."""


class MistralRsError(Exception):
    """Base class of every error this package raises on purpose."""

    http_status = 500
    error_type = "server_error"


class InvalidRequestError(MistralRsError, ValueError):
    """A request (sampling parameters, prompt, messages) is not acceptable."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class PromptTooLongError(InvalidRequestError):
    def __init__(self, message: str):
        super().__init__(message, param="messages", code="context_length_exceeded")


class ModelLoadError(MistralRsError):
    """A model file or directory cannot be used; the message names it and says why."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    pass


class UnsupportedArchitectureError(ModelLoadError):
    pass


class CorruptModelFileError(ModelLoadError):
    pass


class TemplateError(MistralRsError):
    """A chat template failed to render (bad template, or it raised on purpose)."""

    http_status = 400
    error_type = "invalid_request_error"


class NotSupportedError(MistralRsError):
    """A feature that is recognised but not available in this build or configuration."""

    http_status = 400
    error_type = "invalid_request_error"


class TensorParallelError(NotSupportedError):
    """A model cannot be split over the requested devices (heads, KV heads, MLP width, vocab or
    quantized blocks do not divide), or too few devices exist; raised before weights load."""


class ImageError(InvalidRequestError):
    """An image in a request cannot be used (unreadable, unreachable, or the model takes no images)."""

    def __init__(self, message: str, param: str | None = "messages", code: str | None = "invalid_image"):
        super().__init__(message, param=param, code=code)


class InsufficientMemoryError(ModelLoadError, MemoryError):
    """Loading would need more memory than the machine has available; the message names the
    bytes needed and the option that avoids it."""
