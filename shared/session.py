"""Sans-I/O protocol state for both ends of a ControlCanvas connection.

No sockets and no threads: feed each received websocket frame (``str`` for text,
``bytes`` for binary) to ``receive()`` and get events back; call the ``send_*``
methods and collect the frames to write with ``data_to_send()``.  The network
adapters (``backend.server`` and ``shared.client``) are thin loops around these.

Server-side events: :class:`Authenticated`, :class:`Submit` (a generate or
preprocess message with all its images), :class:`Violation` (an error was sent
back; ``fatal`` means the adapter must close the connection) and the plain
messages ``Cancel``, ``Ack``, ``Resume``, ``StatusRequest``, ``ModelsRequest``.

Client-side events: the server messages ``Welcome``, ``Queued``, ``Progress``,
``Error``, ``Status``, ``Models``, plus :class:`PreviewReady` and
:class:`ResultReady`, which carry the images that followed their announcement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from . import codec
from .errors import (AuthError, ControlCanvasError, FieldError, FrameError, LimitError,
                     MissingImage, ProtocolError, StateError)
from .images import Image
from .messages import (CLIENT_MESSAGES, PROTOCOL_VERSION, SERVER_MESSAGES, Ack, Cancel,
                       Error, Generate, GenerateRequest, Hello, Limits, Message, ModelsRequest,
                       Preprocess, Preview, Result, ResultImage, Resume, Scalar, StatusRequest,
                       Train, Welcome, _JOB_ID, from_json, new_job_id, to_json)
from .tokens import same_token

# A websocket message: text, binary, or binary as fragments (header, pixels) that
# the adapter sends as one fragmented message / received with recv_streaming.
Frame = Union[str, bytes, Tuple[bytes, ...]]


# -- events ---------------------------------------------------------------------

@dataclass(frozen=True)
class Authenticated:
    client: str


@dataclass(frozen=True)
class Submit:
    message: Union[Generate, Preprocess, Train]
    images: Dict[int, Image]

    @property
    def job_id(self) -> str:
        return self.message.job_id


@dataclass(frozen=True)
class Violation:
    error: ControlCanvasError
    fatal: bool


@dataclass(frozen=True)
class PreviewReady:
    job_id: str
    step: int
    image: Image


@dataclass(frozen=True)
class ResultReady:
    job_id: str
    images: Tuple[Tuple[ResultImage, Image], ...]
    elapsed: float = 0.0
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def seeds(self) -> Tuple[Optional[int], ...]:
        return tuple(meta.seed for meta, _ in self.images)


class _Session:
    def __init__(self) -> None:
        self._outgoing: List[Frame] = []
        self.closed = False

    def data_to_send(self) -> List[Frame]:
        """Frames to write, in order; each call hands them over once."""
        out, self._outgoing = self._outgoing, []
        return out

    def _queue(self, message: Message) -> None:
        self._outgoing.append(to_json(message))


# -----------------------------------------------------------------------------
# Server side
# -----------------------------------------------------------------------------

@dataclass
class _Upload:
    message: Union[Generate, Preprocess]
    needed: Set[int]
    images: Dict[int, Image] = field(default_factory=dict)


class ServerSession(_Session):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    CLOSED = "closed"

    def __init__(self, *, token: str, limits: Limits, server: str, engine: str,
                 max_job_pixels: int = 0,
                 admit: Optional[Callable[[str], None]] = None,
                 engine_info: Optional[Mapping[str, Scalar]] = None) -> None:
        """``max_job_pixels``: output pixels x batch of one generate job (0: no cap; a
        server-side limit, not in ``Limits``, so older clients still read the welcome).
        ``admit(client)`` runs once the token is right, before the welcome: it raises a
        ControlCanvasError to turn the client away (e.g. every client slot is taken).
        ``engine_info``: the engine's settings, reported in the welcome."""
        super().__init__()
        self._token = token
        self.limits = limits
        self.max_job_pixels = max_job_pixels
        self._admit = admit
        self._server = server
        self._engine = engine
        self._engine_info = dict(engine_info or {})
        self.state = self.AWAIT_HELLO
        self.client = ""
        self._upload: Optional[_Upload] = None
        self._dropped_job: Optional[str] = None  # frames of a refused upload are skipped
        self.close_reason = ""

    # -- input --

    def receive(self, frame: Frame) -> list:
        if self.state == self.CLOSED:
            return []
        events: list = []
        try:
            if isinstance(frame, str):
                events.extend(self._receive_text(frame, events))
            else:
                events.extend(self._receive_binary(frame))
        except ControlCanvasError as err:
            fatal = self.state == self.AWAIT_HELLO
            self.send_error(err)
            if fatal:
                self._close(err.message)
            events.append(Violation(err, fatal))
        return events

    def _receive_text(self, text: str, events: list) -> list:
        if len(text) > self.limits.max_text_bytes or \
                len(text.encode("utf-8", "surrogatepass")) > self.limits.max_text_bytes:
            raise LimitError(f"Text message larger than {self.limits.max_text_bytes} bytes; "
                             f"images must be sent as binary frames.")
        if self._upload is not None:
            # The client moved on before sending every image of its job.
            upload, self._upload = self._upload, None
            events.append(self._abort_upload(upload, MissingImage(
                f"Job {upload.message.job_id} is missing image slot(s) "
                f"{sorted(upload.needed - set(upload.images))}: send every image the request "
                f"refers to as a binary frame right after the request.")))
        try:
            message = from_json(text, CLIENT_MESSAGES)
        except ControlCanvasError as err:
            self._refuse_job(err, _job_id_of(text))
            raise
        if self.state == self.AWAIT_HELLO:
            if not isinstance(message, Hello):
                raise StateError(f"The first message must be 'hello' with the token, not "
                                 f"{message.TYPE!r}.")
            if not same_token(message.token, self._token):
                raise AuthError()
            if self._admit is not None:
                self._admit(message.client)
            self.state = self.READY
            self.client = message.client
            self._queue(Welcome(protocol=PROTOCOL_VERSION, server=self._server,
                                engine=self._engine, limits=self.limits,
                                engine_info=self._engine_info))
            return [Authenticated(message.client)]
        if isinstance(message, Hello):
            raise StateError("Already authenticated; send 'hello' only once per connection.")
        if isinstance(message, (Generate, Preprocess, Train)):
            try:
                return self._begin_upload(message)
            except ControlCanvasError as err:
                self._refuse_job(err, message.job_id)
                raise
        return [message]

    def _refuse_job(self, err: ControlCanvasError, job_id: Optional[str]) -> None:
        """Tie a refusal to its job, and skip the images that follow it."""
        if job_id:
            err.job_id = job_id
            self._dropped_job = job_id

    def _begin_upload(self, message: Union[Generate, Preprocess, Train]) -> list:
        limits = self.limits
        if isinstance(message, Generate):
            req = message.request
            if req.batch > limits.max_batch:
                raise LimitError(f"Batch of {req.batch} exceeds the server's limit of "
                                 f"{limits.max_batch}.", field="request.batch",
                                 job_id=message.job_id)
            _check_size(req.width, req.height, limits, "request.width", message.job_id)
            self._check_job_pixels(req, message.job_id)
        elif isinstance(message, Preprocess) and message.width:
            _check_size(message.width, message.height, limits, "width", message.job_id)
        slots = message.slots()
        if len(slots) > limits.max_images_per_job:
            raise LimitError(f"The request refers to {len(slots)} images; the server accepts "
                             f"at most {limits.max_images_per_job} per job.",
                             job_id=message.job_id)
        if not slots:
            return [Submit(message, {})]
        self._upload = _Upload(message, set(slots))
        return []

    def _check_job_pixels(self, req: GenerateRequest, job_id: str) -> None:
        """Pixels x batch: sixteen images at the per-image limit would be gigabytes."""
        total = req.width * req.height * req.batch
        if self.max_job_pixels and total > self.max_job_pixels:
            fit = max(0, self.max_job_pixels // (req.width * req.height))
            advice = (f"lower the batch to {fit} or less, or the size" if fit else
                      "lower the size")
            raise LimitError(
                f"A batch of {req.batch} at {req.width}x{req.height} is {total:,} output "
                f"pixels; this server's limit is {self.max_job_pixels:,} pixels per job "
                f"(max_job_pixels). To fit it, {advice}; or raise max_job_pixels in the "
                f"server's config.toml.", field="request.batch", job_id=job_id)

    def _receive_binary(self, data: Union[bytes, Tuple[bytes, ...]]) -> list:
        if self.state == self.AWAIT_HELLO:
            raise StateError("The first message must be 'hello' with the token, not an image.")
        size = len(data) if isinstance(data, (bytes, bytearray)) else sum(map(len, data))
        if size > self.limits.max_frame_bytes:
            raise LimitError(f"Binary frame of {size} bytes exceeds the server's limit of "
                             f"{self.limits.max_frame_bytes} bytes.")
        upload = self._upload
        if upload is None:
            head = data if isinstance(data, (bytes, bytearray)) else (data[0] if data else b"")
            if self._dropped_job and codec.frame_job_id(head) == self._dropped_job:
                return []  # the rest of a refused job's images
            raise FrameError("An image frame arrived without a 'generate' or 'preprocess' "
                             "message announcing it; send the request first, then its images.")
        try:
            frame = codec.decode_frame(data, max_image_side=self.limits.max_image_side,
                                       max_pixels=self.limits.max_pixels)
            if frame.kind != codec.KIND_INPUT:
                raise FrameError(f"Clients may send only input image frames, not "
                                 f"{codec.KIND_NAMES[frame.kind]} frames.")
            if frame.job_id != upload.message.job_id:
                raise FrameError(f"Image frame belongs to job {frame.job_id} but job "
                                 f"{upload.message.job_id} is waiting for its images.")
            if frame.slot not in upload.needed:
                raise FrameError(f"Image slot {frame.slot} is not used by job "
                                 f"{upload.message.job_id} (it uses {sorted(upload.needed)}).")
            if frame.slot in upload.images:
                raise FrameError(f"Image slot {frame.slot} of job {upload.message.job_id} was "
                                 f"sent twice.")
        except ControlCanvasError as err:
            self._upload = None
            return [self._abort_upload(upload, err)]
        upload.images[frame.slot] = frame.image
        if len(upload.images) < len(upload.needed):
            return []
        self._upload = None
        return [Submit(upload.message, upload.images)]

    def _abort_upload(self, upload: _Upload, err: ControlCanvasError) -> Violation:
        self._refuse_job(err, upload.message.job_id)
        self.send_error(err)
        return Violation(err, False)

    def _close(self, reason: str) -> None:
        self.state = self.CLOSED
        self.closed = True
        self.close_reason = reason

    # -- output --

    def send(self, message: Message) -> None:
        self._queue(message)

    def send_error(self, err: ControlCanvasError, job_id: Optional[str] = None) -> None:
        self._queue(Error(code=err.code, message=err.message, job_id=job_id or err.job_id,
                          field=err.field))

    def send_preview(self, job_id: str, step: int, image: Image) -> None:
        self._queue(Preview(job_id=job_id, step=step, width=image.width, height=image.height))
        self._outgoing.append(codec.encode_frame_parts(codec.KIND_PREVIEW, job_id, 0, image))

    def send_result(self, job_id: str, images: Sequence[Tuple[Optional[int], Image]],
                    elapsed: float = 0.0, info: Optional[Mapping[str, object]] = None) -> None:
        """One ``result`` message, then its images as frames, with nothing in between.
        ``images``: (seed or None, image) in slot order; the metadata is made here only."""
        metas = tuple(ResultImage(slot=i, width=img.width, height=img.height, seed=seed)
                      for i, (seed, img) in enumerate(images))
        self._queue(Result(job_id=job_id, images=metas, elapsed=elapsed, info=dict(info or {})))
        for i, (_, img) in enumerate(images):
            self._outgoing.append(codec.encode_frame_parts(codec.KIND_RESULT, job_id, i, img))


def _job_id_of(text: str) -> Optional[str]:
    """The well-formed job id of a refused generate/preprocess message, if it has one."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(raw, dict) and raw.get("type") in (Generate.TYPE, Preprocess.TYPE,
                                                      Train.TYPE):
        job_id = raw.get("job_id")
        if isinstance(job_id, str) and _JOB_ID.match(job_id):
            return job_id
    return None


def _check_size(width: int, height: int, limits: Limits, name: str, job_id: str) -> None:
    if width > limits.max_image_side or height > limits.max_image_side:
        raise LimitError(f"Output size {width}x{height} exceeds the server's limit of "
                         f"{limits.max_image_side} px per side.", field=name, job_id=job_id)
    if width * height > limits.max_pixels:
        raise LimitError(f"Output size {width}x{height} exceeds the server's limit of "
                         f"{limits.max_pixels} pixels.", field=name, job_id=job_id)


# -----------------------------------------------------------------------------
# Client side
# -----------------------------------------------------------------------------

class ClientSession(_Session):
    CONNECTING = "connecting"
    READY = "ready"

    def __init__(self, *, token: str, client: str = "") -> None:
        super().__init__()
        self.state = self.CONNECTING
        self.limits: Optional[Limits] = None
        self.welcome: Optional[Welcome] = None
        self._expect: Optional[Union[Preview, Result]] = None
        self._frames: List[Image] = []
        self._queue(Hello(protocol=PROTOCOL_VERSION, token=token, client=client))

    # -- input --

    def receive(self, frame: Frame) -> list:
        """Events for one frame from the server; a broken server raises ProtocolError."""
        if isinstance(frame, str):
            return self._receive_text(frame)
        return self._receive_binary(frame)

    def _receive_text(self, text: str) -> list:
        if self._expect is not None:
            raise ProtocolError(f"The server sent a message while {len(self._frames)} of the "
                                f"images announced by its {self._expect.TYPE!r} had arrived.")
        message = from_json(text, SERVER_MESSAGES)
        if isinstance(message, Welcome):
            self.state = self.READY
            self.welcome = message
            self.limits = message.limits
            return [message]
        if isinstance(message, Result) and not message.images:
            return [ResultReady(message.job_id, (), message.elapsed, dict(message.info))]
        if isinstance(message, (Preview, Result)):
            self._expect = message
            self._frames = []
            return []
        return [message]

    def _receive_binary(self, data: Union[bytes, Tuple[bytes, ...]]) -> list:
        expect = self._expect
        if expect is None:
            raise ProtocolError("The server sent an image frame that no message announced.")
        frame = codec.decode_frame(data, max_image_side=1 << 20, max_pixels=1 << 40)
        want_kind = codec.KIND_PREVIEW if isinstance(expect, Preview) else codec.KIND_RESULT
        if frame.kind != want_kind or frame.job_id != expect.job_id \
                or frame.slot != len(self._frames):
            raise ProtocolError(f"Unexpected image frame (kind {frame.kind}, job "
                                f"{frame.job_id}, slot {frame.slot}) after {expect.TYPE!r}.")
        self._frames.append(frame.image)
        if isinstance(expect, Preview):
            self._expect = None
            return [PreviewReady(expect.job_id, expect.step, frame.image)]
        meta = expect.images[len(self._frames) - 1]
        if (meta.width, meta.height) != frame.image.size:
            raise ProtocolError(f"Result image {meta.slot} is {frame.image.width}x"
                                f"{frame.image.height}, announced {meta.width}x{meta.height}.")
        if len(self._frames) < len(expect.images):
            return []
        self._expect = None
        pairs = tuple(zip(expect.images, self._frames))
        self._frames = []
        return [ResultReady(expect.job_id, pairs, expect.elapsed, dict(expect.info))]

    # -- output --

    def generate(self, request: GenerateRequest, images: Mapping[int, Image], *,
                 job_id: Optional[str] = None, cancel_on_disconnect: bool = False,
                 preview_every: int = 0, live: bool = False) -> str:
        """Queue a generate request and its images; returns the job id. ``live``: a
        throwaway frame of live painting (see ``messages.Generate``)."""
        message = Generate(job_id=job_id or new_job_id(), request=request,
                           cancel_on_disconnect=cancel_on_disconnect,
                           preview_every=preview_every, live=live)
        self._submit(message, images)
        return message.job_id

    def preprocess(self, annotator: str, image: Image, *, params: Optional[dict] = None,
                   width: int = 0, height: int = 0, job_id: Optional[str] = None,
                   cancel_on_disconnect: bool = False) -> str:
        message = Preprocess(job_id=job_id or new_job_id(), annotator=annotator, image=0,
                             params=dict(params or {}), width=width, height=height,
                             cancel_on_disconnect=cancel_on_disconnect)
        self._submit(message, {0: image})
        return message.job_id

    def _submit(self, message: Union[Generate, Preprocess], images: Mapping[int, Image]) -> None:
        slots = set(message.slots())
        missing = slots - set(images)
        if missing:
            raise MissingImage(f"The request refers to image slot(s) {sorted(missing)} but no "
                               f"image was given for them.")
        extra = set(images) - slots
        if extra:
            raise FieldError(f"Image slot(s) {sorted(extra)} are not used by the request; "
                             f"refer to them from init_image, mask_image or a control unit.",
                             field="images")
        if self.limits is not None:
            for slot in sorted(slots):
                img = images[slot]
                _check_size(img.width, img.height, self.limits, f"images[{slot}]",
                            message.job_id)
        self._queue(message)
        for slot in sorted(slots):
            self._outgoing.append(codec.encode_frame_parts(codec.KIND_INPUT, message.job_id,
                                                           slot, images[slot]))

    def train(self, *, job_id: Optional[str] = None, **fields) -> str:
        """Queue a training job (fields of :class:`~shared.messages.Train`)."""
        message = Train(job_id=job_id or new_job_id(), **fields)
        self._queue(message)
        return message.job_id

    def cancel(self, job_id: str) -> None:
        self._queue(Cancel(job_id=job_id))

    def ack(self, *job_ids: str) -> None:
        self._queue(Ack(job_ids=tuple(job_ids)))

    def resume(self, *job_ids: str) -> None:
        self._queue(Resume(job_ids=tuple(job_ids)))

    def status(self) -> None:
        self._queue(StatusRequest())

    def models(self) -> None:
        self._queue(ModelsRequest())
