"""The ANE backend's error type. It imports nothing, so the compiled runtime (``rustane._ane``)
can raise it without importing the backend that imports the runtime."""

__all__ = ["AneError"]


class AneError(RuntimeError):
    """A failed ANE call: ``code`` is the NSError code (e.g. 0x50004) or a negative runtime code,
    ``stage`` names the step (init, descriptor, model, tmpdir, compile, load, surface, lock, request,
    eval, unload)."""

    def __init__(self, code: int, stage: str, message: str):
        self.code = int(code)
        self.stage = stage
        self.message = message
        super().__init__(f"ANE {stage} failed (code {self.code:#x}): {message}")
