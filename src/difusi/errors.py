"""Typed errors. Every user-facing failure is one of these, with a message that names the
field (or file) and what is allowed, so the CLI can print one line and the HTTP API a 4xx."""


class DifusiError(Exception):
    """Base class for every error difusi raises on purpose."""


class ParamError(DifusiError, ValueError):
    """A generation parameter is out of range or of the wrong kind.

    `field` is the A1111 field name (e.g. "steps", "sampler_name") so that front ends can
    point at it: the CLI maps it to its flag, the HTTP API puts it in the JSON body.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class CheckpointError(DifusiError):
    """A model file is missing, unreadable, corrupt or unsafe (e.g. a pickle that needs code)."""


class UnsupportedModelError(CheckpointError):
    """The file is a real checkpoint of a family difusi does not support yet; says what was detected."""


class Interrupted(DifusiError):
    """Generation was stopped between steps by a cancel request; finished images are kept.

    `result` (set by `difusi.pipeline.txt2img`) is the GenerationResult with every image finished before the stop.
    """

    result = None


class NumericalError(DifusiError):
    """The model produced NaN or infinite values, so the image would be black or noise; nothing is saved.

    `phase` is "text encoding", "sampling" or "decoding"; `step` the 1-based sampling step (None outside
    sampling). Usual causes: a broken or half-precision-unsafe checkpoint, or extreme settings (CFG, eta).
    """

    def __init__(self, phase: str, message: str, step: int | None = None):
        super().__init__(message)
        self.phase = phase
        self.step = step


class StorageError(DifusiError):
    """A finished image could not be written to the outputs folder (disk full, file too large, read-only).

    Nothing half-written is left behind and images saved before it are kept. `errno` is the OS error number.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class NetworkError(DifusiError):
    """An extra-network file (LoRA / LyCORIS, textual-inversion embedding, VAE) is missing, unreadable, unsafe,
    of an unknown algorithm, or does not fit the loaded model; the message names the file and what is wrong.

    `name` is what the user wrote (the prompt tag's name, the `--vae` value) or the file's name; `field` the job
    field it came from ("prompt" for LoRA tags and embeddings, "sd_vae" for a VAE), for front ends to point at.
    """

    def __init__(self, name: str, message: str, field: str = "prompt"):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.field = field
