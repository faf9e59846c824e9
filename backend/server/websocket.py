"""The websocket server: a thin asyncio adapter around ``shared.session``.

Security, checked before any protocol byte is read:
- bind 127.0.0.1 by default; another host only when the user passes ``--host``;
- a handshake with an ``Origin`` header is refused (403): browsers always send
  one, editors never do, so no web page can drive this server;
- the ``Host`` header must name a loopback address unless LAN use was chosen
  (defeats DNS rebinding);
- the first message must be ``hello`` with the token, within ``hello_timeout``;
- frame size, text size, image side, pixel count, batch, queue length and the
  number of clients are capped; compression is off (raw images, no zip bombs).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from http import HTTPStatus
from typing import List, Optional

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import backend
from shared.errors import ControlCanvasError, EngineError, LimitError
from shared.images import Image
from shared.messages import (Ack, Cancel, ModelsRequest, Progress, Queued, Resume, Status,
                             StatusRequest)
from shared.session import Authenticated, ServerSession, Submit, Violation

from ..engines.base import Engine
from .config import ServerConfig, is_loopback_host
from .jobs import DONE, Job, JobManager

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008
CLOSE_BUSY = 1013


class Connection:
    """One client: its session, its outbox and the job callbacks that feed it."""

    _ids = itertools.count(1)

    def __init__(self, ws: ServerConnection, session: ServerSession) -> None:
        self.ws = ws
        self.session = session
        self.key = f"conn-{next(self._ids)}"
        self.label = self.key  # + the client's name once authenticated (the log's)
        self._outbox: asyncio.Queue = asyncio.Queue()

    # Job callbacks (loop thread): turn job events into frames.
    def job_queued(self, job: Job, position: int) -> None:
        self.session.send(Queued(job_id=job.job_id, position=position))
        self.flush()

    def job_progress(self, job: Job, step: int, total: int, stage: str) -> None:
        self.session.send(Progress(job_id=job.job_id, step=step, total=total, stage=stage))
        self.flush()

    def job_preview(self, job: Job, step: int, image: Image) -> None:
        self.session.send_preview(job.job_id, step, image)
        self.flush()

    def job_finished(self, job: Job) -> None:
        if job.state == DONE:
            self.session.send_result(job.job_id, job.result, elapsed=round(job.elapsed, 4),
                                     info=job.info)
        else:
            self.session.send_error(job.error, job_id=job.job_id)
        self.flush()

    def flush(self) -> None:
        for frame in self.session.data_to_send():
            self._outbox.put_nowait(frame)

    async def write_loop(self) -> None:
        while True:
            frame = await self._outbox.get()
            if frame is None:
                return
            # a tuple is (header, pixels): one message in two fragments, no copy
            await self.ws.send(frame if isinstance(frame, (str, bytes)) else iter(frame))

    async def drain(self) -> None:
        """Write everything queued so far, then stop the writer."""
        self._outbox.put_nowait(None)


async def _receive(ws: ServerConnection):
    """One message: text as str; binary as its fragments (a one-element tuple when it
    was not fragmented), so the pixels of a (header, pixels) message are not copied."""
    parts = [fragment async for fragment in ws.recv_streaming()]
    if parts and isinstance(parts[0], str):
        return "".join(parts)
    return tuple(parts)


async def _discard_incoming(ws: ServerConnection) -> None:
    try:
        while True:
            await ws.recv()
    except ConnectionClosed:
        pass


class Server:
    def __init__(self, config: ServerConfig, engine: Engine, token: str) -> None:
        self.config = config
        self.engine = engine
        self.token = token
        self.limits = config.limits()
        self.connections: set = set()
        self.manager: Optional[JobManager] = None
        self._server = None
        self._expiry_task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.manager = JobManager(self.engine, loop, max_queue=cfg.max_queue,
                                  retention_seconds=cfg.retention_seconds,
                                  retention_bytes=cfg.retention_bytes,
                                  training=cfg.training_roots())
        self._server = await serve(
            self._handle, cfg.host, cfg.port,
            process_request=self._check_handshake,
            max_size=cfg.max_frame_bytes,
            max_queue=4,
            compression=None,
            close_timeout=2,
            server_header=f"ControlCanvas/{backend.__version__}",
            ping_interval=20, ping_timeout=60,
        )
        self._expiry_task = asyncio.create_task(self._expire_periodically())

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self._server.sockets[0].getsockname()[0]
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{self.port}"

    async def close(self) -> None:
        if self._expiry_task:
            self._expiry_task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.manager is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.manager.close)
        self.engine.close()

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self.config.retention_seconds / 4)))
            self.manager.expire()

    # -- handshake ---------------------------------------------------------------

    def _check_handshake(self, connection: ServerConnection, request):
        headers = request.headers
        if "Origin" in headers:
            log.warning("refused a handshake with Origin %r (a web page?)",
                        headers.get_all("Origin"))
            return connection.respond(
                HTTPStatus.FORBIDDEN,
                "ControlCanvas does not accept connections from web pages (the request carried "
                "an Origin header). Editors' plug-ins connect without one.\n")
        hosts = headers.get_all("Host")
        if len(hosts) != 1 or (not self.config.remote_allowed
                               and not is_loopback_host(hosts[0])):
            log.warning("refused a handshake for Host %r", hosts)
            return connection.respond(
                HTTPStatus.FORBIDDEN,
                "This ControlCanvas server only answers to localhost / 127.0.0.1. To use it "
                "from another machine, start it with --host 0.0.0.0 and use its token.\n")
        if len(self.connections) >= self.config.max_clients:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      "Too many ControlCanvas clients are connected.\n")
        return None

    # -- one connection ------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        session = ServerSession(token=self.token, limits=self.limits,
                                server=f"controlcanvas {backend.__version__}",
                                engine=getattr(self.engine, "name", "unknown"))
        conn = Connection(ws, session)
        self.connections.add(conn)
        writer = asyncio.create_task(conn.write_loop())
        close_code, close_reason = 1000, ""
        try:
            try:
                first = await asyncio.wait_for(_receive(ws), self.config.hello_timeout)
            except asyncio.TimeoutError:
                session.send_error(LimitError(
                    f"No 'hello' within {self.config.hello_timeout:g} s; closing."))
                close_code, close_reason = CLOSE_POLICY, "hello timeout"
                return
            frames = [first]
            while True:
                for frame in frames:
                    self._dispatch(conn, session.receive(frame))
                    conn.flush()
                    if session.closed:
                        close_code = CLOSE_POLICY
                        close_reason = session.close_reason[:120]
                        return
                frames = [await _receive(ws)]
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self.manager.detach(conn)
            conn.flush()
            await conn.drain()
            try:
                await asyncio.wait_for(writer, 10)
            except (ConnectionClosed, asyncio.TimeoutError):
                writer.cancel()
            except Exception:  # a write failed on a dead socket
                log.debug("writer ended with an error", exc_info=True)
            # Keep reading (and discarding) while closing: a client that sent more than
            # the receive queue holds would otherwise never see our close frame.
            drain = asyncio.create_task(_discard_incoming(ws))
            await ws.close(close_code, close_reason)
            drain.cancel()

    def _dispatch(self, conn: Connection, events: List[object]) -> None:
        manager = self.manager
        for event in events:
            try:
                if isinstance(event, Submit):
                    manager.submit(event.message, event.images, conn)
                elif isinstance(event, Cancel):
                    manager.cancel(event.job_id, conn)
                elif isinstance(event, Ack):
                    manager.ack(event.job_ids, conn)
                elif isinstance(event, Resume):
                    for problem in manager.resume(event.job_ids, conn):
                        conn.session.send_error(problem)
                elif isinstance(event, StatusRequest):
                    queue_length, jobs = manager.status(conn)
                    conn.session.send(Status(queue_length=queue_length, jobs=jobs))
                elif isinstance(event, ModelsRequest):
                    conn.session.send(self.engine.models())
                elif isinstance(event, Violation):
                    log.info("%s: refused: %s (%s)", conn.key, event.error.code,
                             event.error.message)
                elif isinstance(event, Authenticated):
                    conn.label = f"{conn.key} ({event.client})"
                    log.info("%s: client %r authenticated", conn.key, event.client)
            except ControlCanvasError as err:
                conn.session.send_error(err)
            except Exception as err:  # a bug must cost one reply, not the connection
                log.exception("%s: failed to handle %r", conn.key, type(event).__name__)
                conn.session.send_error(EngineError(
                    f"The server failed to handle that request ({type(err).__name__}); see "
                    f"its log."))


async def run_server(config: ServerConfig, engine: Engine, token: str,
                     ready=None) -> None:
    """Serve until cancelled. ``ready(server)`` is called once listening."""
    server = Server(config, engine, token)
    await server.start()
    try:
        if ready is not None:
            ready(server)
        await asyncio.Future()
    finally:
        await server.close()

