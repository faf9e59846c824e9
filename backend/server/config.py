"""Server configuration: defaults, the user config folder and the access token.

Precedence: command-line flags > environment (``CONTROLCANVAS_*``) > the TOML
file (``config.toml`` in the config folder, ``[server]`` table) > defaults.
Defaults are the safe ones: loopback only, token required.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from shared import loopback
from shared.messages import Limits

from ..imaging import MAX_IMAGE_SIDE, MAX_PIXELS
from shared.paths import cache_dir, config_dir, token_file  # noqa: F401 (config_dir re-exported)

from ..configfile import load_toml

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7351


def default_token_file() -> Path:
    return token_file()


def default_store_dir() -> Path:
    """Where ``controlcanvas serve`` keeps queued jobs and uncollected results across
    restarts (see backend.server.store): ``jobs`` in the user cache folder."""
    return cache_dir() / "jobs"


NO_STORE = ("", "none", "off")  # store_dir values that keep jobs in memory only


def load_or_create_token(path: Path) -> tuple:
    """Return (token, created). A new token file is created readable by the user only."""
    try:
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token, False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    os.replace(tmp, path)
    return token, True


def is_loopback_host(host: str) -> bool:
    """True for a loopback name or address, with or without brackets and a port
    ('localhost', '127.0.0.1:7351', '[::1]:7351', '::1'): ``shared.loopback``'s rule."""
    return loopback.is_loopback_authority(host.strip())


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token_file: Path = field(default_factory=default_token_file)
    token: Optional[str] = None  # given directly (tests); else read/created from token_file
    engine: str = "diffusers"
    step_seconds: float = 0.0  # fake engine: pretend each step takes this long
    max_image_side: int = MAX_IMAGE_SIDE
    max_pixels: int = MAX_PIXELS
    max_queue: int = 64
    max_batch: int = 16
    max_images_per_job: int = 16
    max_text_bytes: int = 1 << 20
    max_clients: int = 32  # authenticated connections
    # Connections that have not sent a right token yet get their own small budget: a
    # few slots, each held at most hello_timeout seconds, accepting one small text frame.
    # (A client that sends its token in the handshake never waits for one of them.)
    max_unauthenticated: int = 8
    hello_timeout: float = 10.0
    max_hello_bytes: int = 4096
    # Per client: replies and job events waiting to be written (results not included:
    # they are counted by retention_bytes). Past these, the server stops reading from
    # that client (its requests wait in TCP) and drops stale progress/previews.
    max_outbox_bytes: int = 16 << 20
    max_outbox_frames: int = 1024
    max_jobs_per_client: int = 32  # queued or running jobs of one connection
    max_job_pixels: int = 64 << 20  # output width x height x batch of one job
    retention_seconds: float = 3600.0
    retention_bytes: int = 2 << 30  # uncollected results held, all clients together
    retention_bytes_per_client: int = 1 << 30  # ... and of one client
    # The job store (backend.server.store): queued jobs and uncollected results on disk,
    # so they survive a crash. None keeps them in memory only: the default for servers
    # built in code (tests, benches, the demo); build_config (the `serve` command) fills
    # in default_store_dir() unless the setting is "none".
    store_dir: Optional[Path] = None
    preview_size: int = 128
    allow_remote: bool = False  # set by choosing a non-loopback --host
    engine_options: Dict[str, Any] = field(default_factory=dict)

    def limits(self) -> Limits:
        return Limits(
            max_frame_bytes=self.max_frame_bytes,
            max_text_bytes=self.max_text_bytes,
            max_image_side=self.max_image_side,
            max_pixels=self.max_pixels,
            max_queue=self.max_queue,
            max_batch=self.max_batch,
            max_images_per_job=self.max_images_per_job,
        )

    @property
    def max_frame_bytes(self) -> int:
        from shared.codec import HEADER_SIZE
        return HEADER_SIZE + 4 * self.max_pixels

    @property
    def remote_allowed(self) -> bool:
        return self.allow_remote or not is_loopback_host(self.host)


def build_config(overrides: Dict[str, Any], config_file: Optional[Path] = None) -> ServerConfig:
    """Merge defaults, the TOML file, CONTROLCANVAS_* environment and explicit overrides.

    Engine options (device, dtype, offload, the fast path...) come from the ``[engine]``
    table, then ``[server] engine_options``, then the command line, option by option (the
    engine checks their names and values when it is built)."""
    known = {f.name: f for f in dataclasses.fields(ServerConfig)}
    values: Dict[str, Any] = {}
    path = config_file or config_dir() / "config.toml"
    document = load_toml(path)
    table = document.get("server", {})
    engine_table = document.get("engine", {})
    for name, given in (("[engine]", engine_table),
                        ("[server] engine_options", table.get("engine_options", {}))):
        if not isinstance(given, dict):
            raise ValueError(f"{path}: {name} must be a table of engine options")
    for key, value in table.items():
        if key not in known:
            raise ValueError(f"{path}: unknown setting [server] {key}; known: "
                             f"{', '.join(sorted(known))}")
        values[key] = value
    for key, f in known.items():
        env = os.environ.get(f"CONTROLCANVAS_{key.upper()}")
        if env is not None and key not in ("token", "engine_options"):
            values[key] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    store = values.pop("store_dir", None)
    values["engine_options"] = {**engine_table, **table.get("engine_options", {}),
                                **(overrides.get("engine_options") or {})}
    config = ServerConfig()
    if store is None:
        config.store_dir = default_store_dir()
    elif not isinstance(store, (str, Path)):
        raise ValueError(f"store_dir must be a folder name or \"none\", not {store!r}.")
    elif not (isinstance(store, str) and store.strip().lower() in NO_STORE):
        config.store_dir = Path(store).expanduser()
    for key, value in values.items():
        default = getattr(config, key)
        if isinstance(default, bool) and isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)) and not isinstance(default, bool) \
                and isinstance(value, str):
            value = type(default)(value)
        elif isinstance(default, Path) and not isinstance(value, Path):
            value = Path(value).expanduser()
        setattr(config, key, value)
    return config
