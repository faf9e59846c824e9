"""One exception tree for the whole protocol.

Every error has a stable ``code`` (it travels in ``error`` messages and is what
clients and docs key on) and a human sentence that says what to do.  The client
side rebuilds the same class from the code with :func:`error_from_code`.
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class ControlCanvasError(Exception):
    """Base of every error ControlCanvas raises on purpose."""

    code = "internal"
    default_message = "Something went wrong inside ControlCanvas; see the server log."

    def __init__(self, message: Optional[str] = None, *, field: Optional[str] = None,
                 job_id: Optional[str] = None) -> None:
        self.message = message or self.default_message
        self.field = field
        self.job_id = job_id
        super().__init__(self.message)


# -- protocol -----------------------------------------------------------------

class ProtocolError(ControlCanvasError):
    """The other side sent something that breaks the protocol."""

    code = "protocol"
    default_message = "The message does not follow the ControlCanvas protocol."


class MalformedMessage(ProtocolError):
    code = "malformed"
    default_message = "The message is not valid JSON; send one JSON object per text frame."


class UnknownMessage(ProtocolError):
    code = "unknown_type"
    default_message = "Unknown message type; update the plug-in and the server together."


class FieldError(ProtocolError):
    """A field is unknown, missing, mistyped or out of range; ``field`` names it."""

    code = "bad_field"
    default_message = "A field of the message is missing, unknown or has a wrong value."


class VersionMismatch(ProtocolError):
    code = "version"
    default_message = ("The plug-in and the server speak different protocol versions; update "
                       "both to the same release.")


class FrameError(ProtocolError):
    """A binary image frame is malformed or unexpected."""

    code = "bad_frame"
    default_message = "An image frame is malformed or was not announced by a request."


class StateError(ProtocolError):
    """A message arrived that is not allowed in the session's current state."""

    code = "out_of_order"
    default_message = "The message is not allowed at this point; send 'hello' first, once."


class MissingImage(ProtocolError):
    code = "missing_image"
    default_message = "The request refers to an image slot that was not sent."


# -- access and limits ----------------------------------------------------------

class AuthError(ControlCanvasError):
    code = "auth"
    default_message = ("Wrong or missing token. Copy the token the server printed at start "
                       "(it is stored in the token file shown by `controlcanvas serve`).")


class TokenFileError(ControlCanvasError):
    """The token file cannot be used: missing, a folder, a symbolic link, unreadable or
    unwritable. The message names the file and says how to fix it."""

    code = "token_file"
    default_message = ("The token file cannot be used; `controlcanvas doctor` says what is "
                       "wrong with it.")


class PathRefused(ControlCanvasError):
    """A client named a file or folder outside those the server lets clients use. Worded
    the same whether or not the path exists, so it reveals nothing about the machine."""

    code = "path_refused"
    default_message = ("That path is outside the folders this server lets clients use; name "
                       "something inside them (see docs/remote.md).")


class TokenNeeded(AuthError):
    """Client side: the server is not on this computer and no token was entered for it
    (the local token file is sent to loopback addresses only: ``shared.loopback``)."""

    code = "token_needed"
    default_message = ("A server on another computer needs its own token: enter it in the "
                       "plug-in's connection settings (or pass --token).")


class LimitError(ControlCanvasError):
    code = "limit"
    default_message = "The request exceeds one of the server's size limits."


class QueueFull(LimitError):
    code = "queue_full"
    default_message = "The server's queue is full; wait for running jobs to finish, then retry."


# -- configuration --------------------------------------------------------------

class ConfigError(ControlCanvasError, ValueError):
    """A setting (config.toml, CONTROLCANVAS_* environment, command line) is wrong; the
    message names it. Also a ValueError, for callers that catch bad values."""

    code = "config"
    default_message = ("A setting in config.toml, the environment or the command line is "
                       "wrong; the message names it.")


class WeakToken(ConfigError):
    code = "weak_token"
    default_message = ("The configured access token is too short to be safe; remove it to let "
                       "the server make a strong one.")


# -- jobs -----------------------------------------------------------------------

class UnknownJob(ControlCanvasError):
    code = "unknown_job"
    default_message = "No such job on this server for this connection."


class DuplicateJob(ControlCanvasError):
    code = "duplicate_job"
    default_message = "That job id is already in use; give every job a new random id."


class Cancelled(ControlCanvasError):
    code = "cancelled"
    default_message = "The job was cancelled."


class Superseded(Cancelled):
    """A live job replaced by the same client's newer live job before its frame was shown."""

    code = "superseded"
    default_message = ("A newer live frame replaced this one; its result was dropped.")


class Expired(ControlCanvasError):
    code = "expired"
    default_message = "The job's result was kept for its retention time and then discarded."


class Interrupted(ControlCanvasError):
    """The server stopped (crashed, was killed) while it ran the job, and it is not run
    again: it was interrupted too often already, or it is a training run."""

    code = "interrupted"
    default_message = ("The server stopped while it ran this job and does not run it again; "
                       "see the server log for why it stopped, then submit the job again.")


class StoredJobDamaged(ControlCanvasError):
    """A job kept on disk across a server restart could not be read back."""

    code = "store_damaged"
    default_message = ("The server kept this job on disk across a restart, but its files "
                       "were damaged or missing; submit the job again.")


# -- engine ---------------------------------------------------------------------

class EngineError(ControlCanvasError):
    code = "engine"
    default_message = "The image engine failed; see the server log for details."


class OutOfMemory(EngineError):
    code = "out_of_memory"
    default_message = ("The GPU ran out of memory. Lower the output size or batch, close other "
                       "GPU programs, or start the server with --offload.")


class DoesNotFit(OutOfMemory):
    """A base cannot be loaded in the device's free memory by any loading (all on the GPU,
    model or sequential CPU offload); the message names the variant that would fit."""

    code = "does_not_fit"
    default_message = ("The model does not fit this GPU's free memory, even with sequential "
                       "CPU offload; pick a smaller or quantized (GGUF) variant.")


class WorkerLost(EngineError):
    code = "worker_lost"
    default_message = ("The GPU worker running this job stopped (it crashed or lost its device) "
                       "before the job finished; the server is still up. Submit the job again.")


class ModelMissing(EngineError):
    code = "model_missing"
    default_message = ("A model the request needs is not on the server; see "
                       "`controlcanvas models` for what is missing and how to fetch it.")


class HubUnreachable(ModelMissing):
    """The model hub (huggingface.co) cannot be asked: offline mode, no network, a proxy
    in the way. What is not downloaded yet stays missing, and its size is unknown."""

    code = "hub_unreachable"
    default_message = ("huggingface.co cannot be reached (offline mode, or no network), so "
                       "nothing can be downloaded and download sizes are unknown; retry on a "
                       "connected machine.")


class Unsupported(EngineError):
    code = "unsupported"
    default_message = "This server's engine cannot do what the request asks."


class UnsupportedFamily(Unsupported):
    """The model is of a family (Flux, SD3, ...) or a kind the engine does not run yet."""

    code = "unsupported_family"
    default_message = ("The model is of a family this server does not run yet; pick a "
                       "Stable Diffusion 1.5 or SDXL model.")


class UnsupportedCondition(Unsupported):
    """The control model cannot serve this condition or control mode."""

    code = "unsupported_condition"
    default_message = ("The ControlNet cannot serve this condition or control mode; the "
                       "message names one that can.")


class LoraMismatch(Unsupported):
    """A LoRA made for another base model family than the request's base."""

    code = "lora_mismatch"
    default_message = ("A LoRA was made for another kind of base model than the one chosen; "
                       "pick a LoRA listed for this base's family, or another base model.")


class ReferenceUnsupported(Unsupported):
    """An IP-Adapter reference the base model cannot take: a family without IP-Adapter
    support, an adapter made for another family, or a mode the family's adapter cannot
    serve (Flux.1: reference only)."""

    code = "reference_unsupported"
    default_message = ("This base model cannot take an IP-Adapter reference; use an SD1.5, "
                       "SDXL or Flux.1 base, or remove the reference.")


class EditModelNeeded(Unsupported):
    """An edit request (an instruction applied to a layer) on a base that is not an edit
    model."""

    code = "edit_model_needed"
    default_message = ("Edit mode needs an edit model as the base (FLUX.1 Kontext); pick "
                       "one, or use img2img / inpaint with this base.")


# -- client side only -------------------------------------------------------------

class ServerUnavailable(ControlCanvasError):
    code = "unreachable"
    default_message = ("No ControlCanvas server answers at that address. Start it with "
                       "`controlcanvas serve` and check the address and port.")


class ConnectionLost(ControlCanvasError):
    code = "connection_lost"
    default_message = ("The connection to the ControlCanvas server was lost. Unfinished jobs "
                       "keep running; reconnect to get their results.")


def _all_subclasses(cls: Type[ControlCanvasError]):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


ERROR_CLASSES: Dict[str, Type[ControlCanvasError]] = {
    cls.code: cls for cls in [ControlCanvasError, *_all_subclasses(ControlCanvasError)]
}


def error_from_code(code: str, message: str, *, field: Optional[str] = None,
                    job_id: Optional[str] = None) -> ControlCanvasError:
    """Rebuild the typed error that a peer reported by its code (unknown → base class)."""
    cls = ERROR_CLASSES.get(code, ControlCanvasError)
    err = cls(message, field=field, job_id=job_id)
    if cls is ControlCanvasError:
        err.code = code  # keep an unknown code visible rather than mapping it to 'internal'
    return err
