"""Server configuration: defaults, the user config folder and the access token.

Precedence: command-line flags > environment (``CONTROLCANVAS_*``) > the TOML
file (``config.toml`` in the config folder, ``[server]`` table) > defaults.
Defaults are the safe ones: loopback only, token required, training confined to the
per-user data folder. A wrong setting is a :class:`shared.errors.ConfigError` naming it.

The token (:func:`server_token`): one configured with ``token`` (TOML or
``CONTROLCANVAS_TOKEN``) must have at least :data:`MIN_TOKEN_CHARS` characters; else the
token file is read (never through a symbolic link) or created, readable by the user only.
A token file others can read is reported in the log, and the server's own default token
file is set back to 0600 (a file you chose with ``--token-file`` only gets the warning:
you may share it with a group on purpose).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from shared.errors import ConfigError, TokenFileError, WeakToken
from shared import loopback
from shared.messages import Limits

from ..imaging import MAX_IMAGE_SIDE, MAX_PIXELS
from shared.paths import (cache_dir, config_dir, data_dir, load_token_file,  # noqa: F401
                          token_file)

from ..configfile import load_toml, table
from ..training.folders import TrainRoots

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7351
# A generated token is secrets.token_urlsafe(32): 43 characters, 256 random bits. A
# configured one needs at least 32 characters (128 bits even as hex) of some variety.
MIN_TOKEN_CHARS = 32
MIN_TOKEN_DISTINCT = 8
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
NO_STORE = ("", "none", "off")  # store_dir values that keep jobs in memory only


def default_token_file() -> Path:
    return token_file()


def default_store_dir() -> Path:
    """Where ``controlcanvas serve`` keeps queued jobs and uncollected results across
    restarts (see backend.server.store): ``jobs`` in the user cache folder."""
    return cache_dir() / "jobs"


def check_token_strength(token: str, where: str) -> None:
    """WeakToken (saying how to make a good one) for a token that is easy to guess."""
    if len(token) >= MIN_TOKEN_CHARS and len(set(token)) >= MIN_TOKEN_DISTINCT \
            and token.isprintable() and not any(c.isspace() for c in token):
        return
    raise WeakToken(f"The access token {where} is too weak: a token needs at least "
                    f"{MIN_TOKEN_CHARS} characters, varied, without spaces (the server's own "
                    f"have 43 random ones). Make one with: {MAKE_TOKEN} - or remove it and "
                    f"the server makes one in its token file.")


def server_token(config: "ServerConfig") -> Tuple[str, bool]:
    """(token, created): the configured token, else the token file's (made if missing)."""
    if config.token is not None:
        check_token_strength(config.token, "set in config.toml or CONTROLCANVAS_TOKEN")
        return config.token, False
    path = Path(config.token_file)
    return load_or_create_token(path, managed=path == default_token_file())


def load_or_create_token(path: Path, managed: bool = False) -> Tuple[str, bool]:
    """Return (token, created). A new token file is created readable by the user only;
    ``managed``: the file is the server's own (its default place), so loose permissions
    are fixed rather than only reported."""
    path = Path(path)
    try:
        token = load_token_file(path)
    except TokenFileError:
        if not _missing_or_blank(path):
            raise
        return _create_token(path), True
    check_token_strength(token, f"in {path}")
    _check_permissions(path, managed)
    return token, False


def _missing_or_blank(path: Path) -> bool:
    try:
        info = os.lstat(path)
        return stat.S_ISREG(info.st_mode) and not path.read_bytes().strip()
    except FileNotFoundError:
        return True
    except OSError:
        return False


def new_token() -> str:
    """A fresh token: ``secrets.token_urlsafe(32)``, drawn again while it starts with '-'
    (such a token would read as an option after ``--token`` on a command line)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def _create_token(path: Path) -> str:
    token = new_token()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            data = (token + "\n").encode("ascii")
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise TokenFileError(_cannot_write(path, err)) from None
    return token


def _cannot_write(path: Path, err: OSError) -> str:
    """What went wrong writing the token file, and what to do."""
    reason = (err.strerror or type(err).__name__).lower()
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"Cannot write the token file {path}: the disk is full ({reason}). Free some "
                f"space and start the server again.")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"Cannot write the token file {path} ({reason}). Make {path.parent} writable, "
                f"or put the token elsewhere with --token-file or CONTROLCANVAS_CONFIG_DIR.")
    if err.errno == errno.ENOTDIR:
        return (f"Cannot write the token file {path}: a part of that path is a file, not a "
                f"folder. Choose another place with --token-file.")
    return (f"Cannot write the token file {path} ({reason}). Choose another place with "
            f"--token-file.")


def loose_permissions(path: Path) -> int:
    """The token file's mode when group or others may read or write it, else 0 (and
    always 0 on Windows, where the user's profile folder is private)."""
    if os.name == "nt":
        return 0
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    return mode if mode & 0o077 else 0


def _check_permissions(path: Path, managed: bool) -> None:
    mode = loose_permissions(path)
    if not mode:
        return
    if managed:
        try:
            os.chmod(path, 0o600)
            log.warning("The token file %s was readable by other users (mode %o): set it to "
                        "600, readable by you only.", path, mode)
            return
        except OSError:
            pass
    log.warning("The token file %s is readable by other users (mode %o): whoever reads it can "
                "use this server. Run `chmod 600 %s`.", path, mode, path)


def is_loopback_host(host: str) -> bool:
    """True for a loopback name or address, with or without brackets and a port
    ('localhost', '127.0.0.1:7351', '[::1]:7351', '::1'): ``shared.loopback``'s rule."""
    return loopback.is_loopback_authority(host.strip())


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token_file: Path = field(default_factory=default_token_file)
    token: Optional[str] = None  # [server] token / CONTROLCANVAS_TOKEN; else token_file
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
    # Live painting (docs/live.md): a live job may run between two steps of another job
    # when the engine supports it (else it waits for that job to end).
    live_preemption: bool = True
    allow_remote: bool = False  # set by choosing a non-loopback --host
    # Several GPUs (docs/remote.md#several-gpus): one engine and job worker per device
    # ("cuda:0,cuda:1", or "all"); "" runs one engine on [engine] device.
    devices: str = ""
    # Generation as a Ray Serve deployment (the `scale` extra; docs/remote.md#several-hosts)
    ray: bool = False
    ray_address: str = ""  # "": start Ray on this machine; "auto": join the running cluster
    ray_min_replicas: int = 1
    ray_max_replicas: int = 1  # also how many jobs the front sends at once
    ray_gpus_per_replica: float = 1.0  # 0 for CPU replicas (the fake engine always uses 0)
    engine_options: Dict[str, Any] = field(default_factory=dict)
    # where a client's `train` message may read datasets and write ControlNets
    train_data_root: Path = field(default_factory=lambda: data_dir() / "datasets")
    train_out_root: Path = field(default_factory=lambda: data_dir() / "models" / "trained")

    def training_roots(self) -> TrainRoots:
        return TrainRoots(Path(self.train_data_root), Path(self.train_out_root),
                          self.engine_options.get("config_file"))

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
    """Merge defaults, the TOML file, CONTROLCANVAS_* environment and explicit overrides;
    ConfigError names a setting that is unknown or has the wrong type.

    Engine options (device, dtype, offload, the fast path...) come from the ``[engine]``
    table, then ``[server] engine_options``, then the command line, option by option (the
    engine checks their names and values when it is built: ConfigError too)."""
    known = {f.name: f for f in dataclasses.fields(ServerConfig)}
    values: Dict[str, Tuple[Any, str]] = {}
    path = config_file or config_dir() / "config.toml"
    document = load_toml(path)
    server = table(document, "server", path)
    engine_table = table(document, "engine", path)
    for key, value in server.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown setting [server] {key}; known: "
                              f"{', '.join(sorted(known))}")
        values[key] = (value, f"{path}: [server] {key}")
    for key in known:
        env = os.environ.get(f"CONTROLCANVAS_{key.upper()}")
        if env and key != "engine_options":  # set and not empty
            values[key] = (env, f"CONTROLCANVAS_{key.upper()}")
    values.update({k: (v, f"--{k.replace('_', '-')}") for k, v in overrides.items()
                   if v is not None})
    store = values.pop("store_dir", None)
    values.pop("engine_options", None)
    config = ServerConfig()
    for options, where in ((engine_table, f"{path}: [engine]"),
                           (server.get("engine_options", {}), f"{path}: [server] engine_options"),
                           (overrides.get("engine_options") or {}, "--engine-options")):
        config.engine_options.update(_coerce(options, {}, where))  # option by option
    config.store_dir = _store_dir(store)
    for key, (value, where) in values.items():
        setattr(config, key, _coerce(value, getattr(config, key), where, key != "token"))
    return config


def _store_dir(given: Optional[Tuple[Any, str]]) -> Optional[Path]:
    """The job store's folder: the default, a folder given, or None for "none"/"off"."""
    if given is None:
        return default_store_dir()
    value, where = given
    if isinstance(value, str) and value.strip().lower() in NO_STORE:
        return None
    if isinstance(value, (str, Path)):
        return Path(value).expanduser()
    raise ConfigError(f"{where}: store_dir must be a folder name or \"none\"; got "
                      f"{type(value).__name__}.")


def _coerce(value: Any, default: Any, where: str, show: bool = True) -> Any:
    """``value`` as the type of ``default`` (text from the environment is converted)."""
    got = f"; got {value!r}" if show and isinstance(value, str) else \
        f"; got {type(value).__name__}" if not isinstance(value, str) else ""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            return word in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false{got}.")
    if isinstance(default, (int, float)):
        number = _number(value, type(default))
        if number is None:
            what = "a whole number" if isinstance(default, int) else "a number"
            raise ConfigError(f"{where} must be {what}{got}.")
        return number
    if isinstance(default, Path):
        if isinstance(value, (str, Path)) and str(value).strip():
            return Path(value).expanduser()
        raise ConfigError(f"{where} must be a path (text in quotes){got}.")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where} must be a table{got}.")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be text in quotes{got}.")


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            return None
    if isinstance(value, float) and kind is int:
        return int(value) if value.is_integer() else None
    return kind(value) if isinstance(value, (int, float)) else None
