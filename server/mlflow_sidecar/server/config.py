"""Typed configuration: defaults, then a YAML file, then `MLFLOW_SIDECAR__SECTION__KEY` env vars.

Defaults serve one machine with no setup: 127.0.0.1:50051 and an embedded MLflow
store (SQLite + local artifacts) under the data dir.
"""

from __future__ import annotations

import contextvars
import difflib
import errno
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from mlflow_sidecar.core import bearer_tokens
from mlflow_sidecar.core.limits import CHUNK_FRAMING_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from mlflow_sidecar.core.service_links import is_service_link
from mlflow_sidecar.core.settings_model import NumbersRefuseBooleans
from mlflow_sidecar.server.redaction import redact
from mlflow_sidecar.server.uri_syntax import uri_syntax_problem

ENV_PREFIX = "MLFLOW_SIDECAR__"
CONFIG_FILE_ENV = "MLFLOW_SIDECAR_CONFIG"
# Every variable of the sidecar's starts so; the clients' continue with CLIENT_.
_OWN_PREFIX = "MLFLOW_SIDECAR_"
_CLIENT_PREFIX = "MLFLOW_SIDECAR_CLIENT_"
MIB = 1024 * 1024
GIB = 1024 * MIB
# What a stop needs after the spool's drain: background tasks, listeners, the last count.
STOP_MARGIN_S = 2.0

# The YAML file of the load in progress; a context variable keeps loads independent.
_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("yaml_file", default=None)
_reads_mlflow_env: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "reads_mlflow_env", default=True
)

# MLflow's own variables, honoured for the `mlflow` section when the sidecar's keys are unset.
MLFLOW_ENV_KEYS: Mapping[str, str] = {
    "MLFLOW_TRACKING_URI": "tracking_uri",
    "MLFLOW_REGISTRY_URI": "registry_uri",
    "MLFLOW_TRACKING_USERNAME": "username",
    "MLFLOW_TRACKING_PASSWORD": "password",
    "MLFLOW_TRACKING_TOKEN": "token",
    "MLFLOW_TRACKING_INSECURE_TLS": "insecure_tls",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "request_timeout_s",
}

# Values this process wrote into MLflow's variables itself (for MLflow's client): read back,
# they would carry one configuration's settings into the next load in the same process.
_exported: dict[str, str] = {}


def drain_for_grace(grace_s: float) -> float:
    """The spool drain an unset `spool.drain_on_stop_s` gets within `server.grace_s`: the
    grace less STOP_MARGIN_S, and never under 80 % of it (a short grace still drains)."""
    return max(grace_s - STOP_MARGIN_S, 0.8 * grace_s)


def bare_host(host: str) -> str:
    """`host` without the brackets of an IPv6 literal (`[::1]` -> `::1`); ValueError for
    a bracketed or colon-holding host that is not an IPv6 address."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if inner != host or ":" in inner:
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{host!r} is not a host name or IP address") from None
    return inner


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC and URLs take it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def export_mlflow_env(name: str, value: str) -> None:
    """Set one of MLflow's variables for MLflow's client, remembering that the sidecar did;
    an empty `value` removes the variable, as MLflow's client reads any value as set."""
    if not value:
        os.environ.pop(name, None)
        _exported.pop(name, None)
        return
    os.environ[name] = value
    _exported[name] = value


def _mlflow_env_values() -> dict[str, str]:
    """The `mlflow` keys set through MLflow's own variables (not the ones this process set)."""
    values: dict[str, str] = {}
    for name, key in MLFLOW_ENV_KEYS.items():
        value = os.environ.get(name)
        if value and _exported.get(name) != value:
            values[key] = value
    return values


class _MlflowEnvSource(PydanticBaseSettingsSource):
    """MLflow's variables, below every source of the sidecar's own (env, file, arguments)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values = _mlflow_env_values()
        return {"mlflow": values} if values else {}


class _Section(NumbersRefuseBooleans):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    """The gRPC listener and its limits."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    workers: int = Field(
        64,
        ge=2,
        le=1024,
        description="threads serving RPCs; streams take at most max_streaming_rpcs"
        " + max_waiting_streams of them",
    )
    grace_s: float = Field(10.0, ge=0, description="drain time on SIGTERM/SIGINT")
    max_message_bytes: int = Field(8 * MIB, ge=64 * 1024, le=1024 * MIB)
    # At least 2: streams are held below it (max_streaming_rpcs), and one call in progress
    # is always left to unary calls.
    max_concurrent_rpcs: int = Field(
        256,
        ge=2,
        le=100_000,
        description="calls in progress before RESOURCE_EXHAUSTED; at least 2",
    )
    max_concurrent_streams: int = Field(100, ge=1, le=10_000, description="per HTTP/2 connection")
    max_streaming_rpcs: int = Field(
        0,
        ge=0,
        le=1023,
        validate_default=True,
        description="streaming calls served at once (each holds a worker for its whole life);"
        " below workers, whose rest serve unary calls; 0: half of workers",
    )
    max_waiting_streams: int = Field(
        -1,
        ge=-1,
        le=1022,
        validate_default=True,
        description="streaming calls beyond max_streaming_rpcs that wait in line (on a worker)"
        " for a slot, first come first served; more are refused with RESOURCE_EXHAUSTED;"
        " -1: a quarter of workers, within what is left",
    )
    stream_wait_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="how long a stream waits in line before it is refused (never past its"
        " deadline)",
    )
    max_metadata_bytes: int = Field(16 * 1024, ge=1024, le=1 * MIB)
    default_deadline_s: float = Field(
        60.0, gt=0, description="bounds retries and waits of calls that set no deadline"
    )
    allow_insecure_remote: bool = Field(
        False, description="listen on a non-loopback address without auth and TLS"
    )

    @field_validator("host")
    @classmethod
    def _bare_host(cls, value: str) -> str:
        # `::1` and `[::1]` both: kept bare, bracketed where an address needs it.
        return bare_host(value)

    @field_validator("max_streaming_rpcs")
    @classmethod
    def _streams_leave_workers_for_unary_calls(cls, value: int, info: ValidationInfo) -> int:
        workers = info.data.get("workers")
        max_rpcs = info.data.get("max_concurrent_rpcs")
        if not isinstance(workers, int) or not isinstance(max_rpcs, int):
            return value  # their own errors are reported
        if value == 0:
            # Half the workers, and at least one stream and one worker for unary calls
            # (workers and max_concurrent_rpcs are at least 2, so this stays below both).
            return max(1, min(workers // 2, max_rpcs - 1))
        if value >= workers:
            raise ValueError(
                f"max_streaming_rpcs ({value}) must be below server.workers ({workers}):"
                " the workers above it serve unary calls, which must never wait behind"
                " long-lived streams"
            )
        if value >= max_rpcs:
            raise ValueError(
                f"max_streaming_rpcs ({value}) must be below server.max_concurrent_rpcs"
                f" ({max_rpcs}): streams must leave room for unary calls"
            )
        return value

    @field_validator("max_waiting_streams")
    @classmethod
    def _waiting_streams_leave_workers_for_unary_calls(
        cls, value: int, info: ValidationInfo
    ) -> int:
        workers = info.data.get("workers")
        max_rpcs = info.data.get("max_concurrent_rpcs")
        served = info.data.get("max_streaming_rpcs")
        if not all(isinstance(n, int) for n in (workers, max_rpcs, served)):
            return value  # their own errors are reported
        assert isinstance(workers, int) and isinstance(max_rpcs, int) and isinstance(served, int)
        # A waiting stream holds a worker too: served and waiting streams together must
        # leave at least one worker, and one call in progress, to unary calls.
        room = min(workers, max_rpcs) - 1 - served
        if value == -1:
            return max(0, min(workers // 4, room))
        if value > room:
            raise ValueError(
                f"max_waiting_streams ({value}) plus server.max_streaming_rpcs ({served})"
                f" must be below server.workers ({workers}) and server.max_concurrent_rpcs"
                f" ({max_rpcs}): a waiting stream holds a worker too, and unary calls need"
                f" the rest; at most {max(0, room)} here"
            )
        return value


def _empty_is_unset(value: object) -> object:
    # Their documented default is "empty", and a templated variable left blank says so; as
    # a path it would read as "." and be refused as a file that is the working directory.
    if isinstance(value, str) and not value.strip():
        return None
    return value


OptionalFile = Annotated[Path | None, BeforeValidator(_empty_is_unset)]
"""A file setting that may be unset: None, or an empty value, which means the same."""


class TlsConfig(_Section):
    """TLS for the listener; with `client_ca_file` clients must present a certificate (mTLS)."""

    cert_file: OptionalFile = None
    key_file: OptionalFile = None
    client_ca_file: OptionalFile = None

    @model_validator(mode="after")
    def _complete(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        """True when the listener speaks TLS."""
        return self.cert_file is not None


class AuthConfig(_Section):
    """Bearer tokens accepted on every RPC but health; none configured means no auth."""

    tokens: list[SecretStr] = Field(default_factory=list)
    tokens_file: OptionalFile = Field(None, description="one token per line; # starts a comment")

    @field_validator("tokens")
    @classmethod
    def _tokens_fit_a_header(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        # No client could present such a token: every call would be UNAUTHENTICATED.
        for index, token in enumerate(tokens):
            if not bearer_tokens.sendable(token.get_secret_value()):
                raise ValueError(f"auth.tokens[{index}] {bearer_tokens.UNSENDABLE}")
        return tokens

    def load_tokens(self) -> tuple[str, ...]:
        """Every accepted token, from the list and the file."""
        tokens = [t.get_secret_value() for t in self.tokens]
        if self.tokens_file is not None:
            try:
                text = self.tokens_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                # The reason only: the file's bytes may be a token.
                reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
                raise ConfigError(
                    f"invalid config key auth.tokens_file: {self.tokens_file}: {reason}"
                ) from None
            for number, raw in enumerate(text.splitlines(), start=1):
                line = raw.strip()
                if line and not line.startswith("#"):
                    if not bearer_tokens.sendable(line):
                        raise ConfigError(
                            f"invalid config key auth.tokens_file: {self.tokens_file}: line"
                            f" {number} {bearer_tokens.UNSENDABLE} (value not shown)"
                        )
                    tokens.append(line)
        return tuple(t for t in tokens if t)

    @property
    def enabled(self) -> bool:
        """True when tokens are configured."""
        return bool(self.tokens) or self.tokens_file is not None


class MetricsConfig(_Section):
    """Prometheus metrics on their own HTTP port; port 0 turns them off."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)

    @field_validator("host")
    @classmethod
    def _bare_host(cls, value: str) -> str:
        return bare_host(value)


class HealthConfig(_Section):
    """What `/readyz` on the metrics port requires besides a serving gRPC listener."""

    ready_requires_mlflow: bool = Field(
        True,
        description="not ready while MLflow fails its probe; false stays ready through MLflow"
        " outages (the spool takes metrics meanwhile)",
    )
    spool_high_water: float = Field(
        0.9,
        gt=0,
        le=1,
        description="not ready while pending points reach this fraction of spool.max_points",
    )


class MlflowConfig(_Section):
    """Where MLflow lives and how to reach it. Empty URIs mean the embedded store."""

    tracking_uri: str = ""
    registry_uri: str = ""
    username: str = ""
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    insecure_tls: bool = False
    request_timeout_s: int = Field(30, ge=1, le=3600, description="one HTTP request to MLflow")
    probe_interval_s: float = Field(
        5.0, ge=0.1, le=3600, description="how often the `mlflow` health service pings MLflow"
    )


class WatchConfig(_Section):
    """WatchModelAlias: one poller per watched model reads its aliases from MLflow."""

    poll_interval_s: float = Field(
        5.0,
        ge=0.05,
        le=3600,
        description="how often a model's poller reads its aliases, whatever the number of watchers",
    )
    poll_jitter: float = Field(
        0.1,
        ge=0,
        le=0.5,
        description="each interval is drawn within this fraction of poll_interval_s either"
        " way, so that pollers started together do not poll in step",
    )
    heartbeat_s: float = Field(
        30.0, ge=0.1, le=3600, description="a status message at least this often per stream"
    )


class RetryConfig(_Section):
    """Retries of transient MLflow failures (exponential backoff with jitter)."""

    max_tries: int = Field(6, ge=1, le=100)
    max_time_s: float = Field(
        30.0, gt=0, description="longest a call retries MLflow (a nearer deadline ends it first)"
    )
    factor_s: float = Field(0.2, gt=0, description="first backoff step")
    max_backoff_s: float = Field(5.0, gt=0)
    jitter: bool = True


class SpoolConfig(_Section):
    """The durable metric spool (SQLite in WAL mode at `<data_dir>/spool.db`)."""

    max_points: int = Field(
        10_000_000, ge=1, description="pending points before RESOURCE_EXHAUSTED"
    )
    min_free_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="free space on the data dir's filesystem that accepting points never"
        " uses: room for delivery's own writes (0: none kept)",
    )
    batch_size: int = Field(1000, ge=1, le=1000, description="points per MLflow log_batch")
    delivery_workers: int = Field(
        4,
        ge=1,
        le=32,
        description="most log_batch calls in flight at once (of runs, or of one run's"
        " series; one batch at a time per series); fewer while more do not deliver more",
    )
    flush_timeout_s: float = Field(
        60.0, gt=0, description="longest FlushMetrics wait when it sets no max_wait_s"
    )
    # NORMAL survives a killed process; FULL also survives power loss, at an fsync per message.
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    drain_on_stop_s: float = Field(
        8.0,
        ge=0,
        description="on SIGTERM, how long pending points are delivered before the process"
        " exits; within server.grace_s (unset, it follows the grace: server.grace_s minus"
        " 2 s, at least 80 % of it)",
    )


class RequestsConfig(_Section):
    """The request ledger (`<data_dir>/requests.db`): first outcomes of calls that carry a
    `request_id`, so that a retry answers with them."""

    retention_s: float = Field(
        86_400.0,
        ge=60,
        description="how long a request id is remembered; a retry after that may act again",
    )


class ArtifactsConfig(_Section):
    """Streamed artifact and model transfers. In-flight files are staged in `<data_dir>/tmp`."""

    chunk_bytes: int = Field(
        MIB,
        ge=MIN_CHUNK_BYTES,
        le=MAX_CHUNK_BYTES,
        description="bytes per message of a download; must fit server.max_message_bytes"
        " (unset, it shrinks to fit a smaller limit)",
    )
    max_upload_bytes: int = Field(
        8 * GIB, ge=1, description="largest artifact, or model directory in total, accepted"
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="host directories artifact locations and model sources may lie under"
        " (the embedded store's <data_dir>/artifacts always counts)",
    )
    allowed_uris: list[str] = Field(
        default_factory=list,
        description="remote artifact stores (e.g. s3://bucket/prefix) beyond the tracking"
        " server's own",
    )

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        roots = [root.expanduser() for root in value]
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"{root} is not an absolute path")
        return roots

    @field_validator("allowed_uris")
    @classmethod
    def _remote_uris(cls, value: list[str]) -> list[str]:
        for uri in value:
            scheme, sep, rest = uri.partition("://")
            if not sep or not scheme or not rest.strip("/"):
                raise ValueError(f"{uri!r} is not a URI like s3://bucket/prefix")
            if scheme.lower() in ("file", "runs", "models"):
                raise ValueError(f"{uri!r}: local paths go in artifacts.allowed_roots")
            # Every location under such a prefix (`S3://b`, say) is refused as UNSAFE_URI:
            # the entry would allow nothing.
            problem = uri_syntax_problem(uri)
            if problem:
                raise ValueError(f"{uri!r} {problem}: no location under it could be allowed")
        return value


class ModelCacheConfig(_Section):
    """The model cache at `<data_dir>/models`: verified copies of downloaded model versions."""

    max_bytes: int = Field(
        10 * GIB,
        ge=0,
        description="bytes of model files the cache holds at most, least recently used"
        " evicted first; 0 turns the cache off",
    )


class AppConfig(BaseSettings):
    """The sidecar's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        # `model_cache` is a section, not pydantic's: older pydantic releases warn about
        # any field that starts with "model_" unless told otherwise.
        protected_namespaces=(),
    )

    # Expanded when validated, not at import: a process without a home directory (a
    # container's uid with no passwd entry and no HOME) still runs with data_dir set.
    data_dir: Path = Field(Path("~/.mlflow-sidecar"), validate_default=True)
    server: ServerConfig = ServerConfig()
    mlflow: MlflowConfig = MlflowConfig()
    retry: RetryConfig = RetryConfig()
    spool: SpoolConfig = SpoolConfig()
    requests: RequestsConfig = RequestsConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    metrics: MetricsConfig = MetricsConfig()
    health: HealthConfig = HealthConfig()
    watch: WatchConfig = WatchConfig()
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig, validate_default=True)
    model_cache: ModelCacheConfig = ModelCacheConfig()
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    log_format: Literal["text", "json"] = "text"

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_given(cls, value: object) -> object:
        # An empty path reads as "." and would make the working directory the data dir.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty; unset, it is ~/.mlflow-sidecar")
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        try:
            return value.expanduser().absolute()
        except RuntimeError:  # no HOME, and no passwd entry for this uid
            raise ValueError(
                f"{value} needs a home directory and this process has none (HOME unset):"
                " set data_dir to an absolute path"
            ) from None

    @field_validator("spool")
    @classmethod
    def _drain_fits_grace(cls, value: SpoolConfig, info: ValidationInfo) -> SpoolConfig:
        server = info.data.get("server")
        if not isinstance(server, ServerConfig):
            return value
        if "drain_on_stop_s" not in value.model_fields_set:
            # A longer grace is given to deliver more: unset, the drain uses it, less the
            # time the rest of the stop (background tasks, listeners) may need.
            return value.model_copy(update={"drain_on_stop_s": drain_for_grace(server.grace_s)})
        if value.drain_on_stop_s > server.grace_s:
            raise ValueError(
                f"drain_on_stop_s ({value.drain_on_stop_s}) must not exceed server.grace_s"
                f" ({server.grace_s}): the drain happens within the grace period"
            )
        return value

    @field_validator("artifacts")
    @classmethod
    def _chunks_fit_messages(cls, value: ArtifactsConfig, info: ValidationInfo) -> ArtifactsConfig:
        server = info.data.get("server")
        if not isinstance(server, ServerConfig):
            return value
        room = server.max_message_bytes - CHUNK_FRAMING_BYTES
        if value.chunk_bytes <= room:
            return value
        if "chunk_bytes" in value.model_fields_set:
            raise ValueError(
                f"chunk_bytes ({value.chunk_bytes}) plus {CHUNK_FRAMING_BYTES} bytes of framing"
                f" must fit server.max_message_bytes ({server.max_message_bytes})"
            )
        # Left at its default, the chunk size shrinks to what the message limit allows.
        return value.model_copy(update={"chunk_bytes": room})

    @property
    def staging_dir(self) -> Path:
        """Where uploads and downloads in flight are staged; emptied at start."""
        return self.data_dir / "tmp"

    @property
    def model_cache_dir(self) -> Path:
        """Where the model cache keeps its entries."""
        return self.data_dir / "models"

    @property
    def model_cache_scope(self) -> str:
        """Names the registry and the artifact storage policy: a cached model is served
        only under the ones it was fetched and checked under (a hit reads no artifact
        store, so the policy's check happened when the version was fetched)."""
        policy = json.dumps(
            [
                self.registry_uri,
                sorted(str(root) for root in self.allowed_roots),
                sorted(self.artifacts.allowed_uris),
            ]
        )
        return hashlib.sha256(policy.encode()).hexdigest()[:16]

    @property
    def tracking_uri(self) -> str:
        """The configured tracking URI, or the embedded SQLite store in the data dir."""
        return self.mlflow.tracking_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"

    @property
    def registry_uri(self) -> str:
        """The configured registry URI, or the tracking URI."""
        return self.mlflow.registry_uri or self.tracking_uri

    @property
    def artifact_root(self) -> Path:
        """Where the embedded store keeps artifacts."""
        return self.data_dir / "artifacts"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        """Host directories the sidecar may read and write artifacts under: the embedded
        store's artifact root (when embedded) and `artifacts.allowed_roots`."""
        own = (self.artifact_root,) if self.embedded else ()
        return own + tuple(self.artifacts.allowed_roots)

    @property
    def spool_path(self) -> Path:
        """The spool database."""
        return self.data_dir / "spool.db"

    @property
    def requests_path(self) -> Path:
        """The request ledger database."""
        return self.data_dir / "requests.db"

    @property
    def embedded(self) -> bool:
        """True when no tracking server is configured."""
        return not self.mlflow.tracking_uri

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _yaml_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        if _reads_mlflow_env.get():
            sources.append(_MlflowEnvSource(settings_cls))
        return tuple(sources)


class ConfigError(Exception):
    """The configuration is invalid; the message is one line naming the bad key."""


def _build_config(path: Path | None, overrides: dict[str, Any], uses_mlflow: bool) -> AppConfig:
    """The settings from every source, or ConfigError in one line naming what is wrong."""
    token = _yaml_file.set(path)
    reads_mlflow_env = _reads_mlflow_env.set(uses_mlflow)
    try:
        return AppConfig(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from exc
    except ValueError as exc:  # env values that are not valid JSON
        raise ConfigError(
            f"invalid configuration: {exc}".splitlines()[0] + _not_json(os.environ)
        ) from exc
    except Exception as exc:
        # PyYAML's errors are no ValueError; anything else here is the file's fault too.
        if path is None or type(exc).__module__.split(".")[0] != "yaml":
            raise
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from exc
    finally:
        _reads_mlflow_env.reset(reads_mlflow_env)
        _yaml_file.reset(token)


def _not_json(environ: Mapping[str, str]) -> str:
    """The sidecar's variables that must be JSON (sections, lists, mappings) and are not,
    as words to add to pydantic's error, which names the section only."""
    bad = sorted(
        name
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX)
        and (_wants_json(name) or value.lstrip()[:1] in ("[", "{"))
        and not _is_json(value)
    )
    if not bad:
        return ""
    return (
        f': {", ".join(bad)} must be JSON (a list like \'["a", "b"]\', a mapping like'
        ' \'{"key": "value"}\')'
    )


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _wants_json(name: str) -> bool:
    """True when the variable `name` sets a whole section, or a list or mapping setting."""
    section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
    field = AppConfig.model_fields.get(section)
    if field is None:
        return False
    fields: Mapping[str, Any] = getattr(field.annotation, "model_fields", {})
    if not key:
        return bool(fields)
    annotation = getattr(fields.get(key), "annotation", None)
    return getattr(annotation, "__origin__", annotation) in (list, dict, tuple, set, frozenset)


def _check_readable(path: Path) -> None:
    """ConfigError when the config file cannot be read (a secret mounted for another user,
    say): the settings' own reading would fail with a traceback."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"config file {path} cannot be read ({exc.strerror or type(exc).__name__})"
        ) from None


def _check_yaml_top_level(path: Path) -> None:
    """A config file holds a mapping of sections (or nothing at all), each key once."""
    import yaml  # only with a config file: a client-only install has no PyYAML

    from mlflow_sidecar.server.config_yaml import repeated_key

    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return  # reported when the settings read it, with the file's own problem
    repeated = repeated_key(text)
    if repeated is not None:
        raise ConfigError(
            f"config file {path} gives the key {repeated} twice: YAML would keep the last"
            " and drop the first without a word; merge them into one"
        )
    if data is not None and not isinstance(data, dict):
        kind = {bool: "boolean", int: "number", float: "number", str: "string"}.get(
            type(data), type(data).__name__
        )
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (server:, mlflow:, ...);"
            f" it holds a {kind}"
        )


def load_config(
    config_file: str | Path | None = None, *, uses_mlflow: bool = True, **overrides: Any
) -> AppConfig:
    """Load the configuration from defaults, the YAML file, env vars and `overrides`.

    `config_file` (else `$MLFLOW_SIDECAR_CONFIG`) names the YAML file; env vars win over it.
    `uses_mlflow=False` is for commands that never reach MLflow (health, spool): MLflow's
    own variables are not read and the MLflow URIs not checked, so that a trainer's
    environment (`MLFLOW_TRACKING_URI=sidecar://...`) does not refuse them.
    """
    chosen = config_file or os.environ.get(CONFIG_FILE_ENV) or None
    path = Path(chosen) if chosen else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path is not None:
        _check_readable(path)
    _check_env_names(os.environ)
    if path is not None:
        _check_yaml_top_level(path)
    config = _build_config(path, overrides, uses_mlflow)
    _check_files(config)
    _check_bind_policy(config)
    if uses_mlflow:
        _check_backend_is_not_a_sidecar(config)
        _check_backend_is_not_own_port(config)
    return config


def _same_listener(host: str, listen_host: str) -> bool:
    """Whether a URI's `host` reaches a listener on `listen_host` (bare, as configured):
    the same address, `localhost` for a loopback one, or loopback for a wildcard one."""
    listen = listen_host.lower()
    if host == listen:
        return True
    if listen in ("", "0.0.0.0", "::"):
        return is_loopback(host)
    return (host == "localhost" and is_loopback(listen)) or (
        listen == "localhost" and is_loopback(host)
    )


def _check_backend_is_not_own_port(config: AppConfig) -> None:
    """Refuse an MLflow URI naming this host at the sidecar's own gRPC or metrics port:
    no MLflow answers there, so every call would fail UNAVAILABLE and the spool keep every
    point it accepted, while the sidecar served as if MLflow were merely down."""
    own = {
        "server.port": (config.server.host, config.server.port),
        "metrics.port": (config.metrics.host, config.metrics.port),
    }
    for key, mlflow_var in (
        ("tracking_uri", "MLFLOW_TRACKING_URI"),
        ("registry_uri", "MLFLOW_REGISTRY_URI"),
    ):
        parts = urllib.parse.urlsplit(str(getattr(config.mlflow, key)))
        if parts.scheme.lower() not in ("http", "https"):
            continue
        try:
            port = parts.port
        except ValueError:
            continue  # MLflow's own check names such a URI
        host = parts.hostname or ""
        for setting, (listen_host, taken) in own.items():
            if taken and port == taken and _same_listener(host, listen_host):
                raise ConfigError(
                    f"invalid config key mlflow.{key} ({ENV_PREFIX}MLFLOW__{key.upper()}, else"
                    f" MLflow's {mlflow_var}): {redact_uri(parts.geturl())} is this sidecar's"
                    f" own {setting} ({taken}), where no MLflow answers: name the MLflow"
                    " server's port"
                )


# The schemes of the sidecar's own MLflow plugin: URIs for trainers, never for the sidecar.
_SIDECAR_SCHEMES = ("sidecar", "sidecar+tls")


def _check_backend_is_not_a_sidecar(config: AppConfig) -> None:
    """Refuse a `sidecar://` tracking or registry URI: the sidecar would call a sidecar
    (itself, when a trainer's environment started it) for every call, until its deadline."""
    for key, mlflow_var in (
        ("tracking_uri", "MLFLOW_TRACKING_URI"),
        ("registry_uri", "MLFLOW_REGISTRY_URI"),
    ):
        uri = str(getattr(config.mlflow, key))
        if uri.split("://", 1)[0].lower() in _SIDECAR_SCHEMES and "://" in uri:
            raise ConfigError(
                f"invalid config key mlflow.{key} ({ENV_PREFIX}MLFLOW__{key.upper()}, else"
                f" MLflow's {mlflow_var}): {redact_uri(uri)} names a sidecar, and the sidecar"
                " needs MLflow itself: an MLflow server (http(s)://), a database or a file"
                f" store. `{mlflow_var}=sidecar://...` is for trainers; unset it where the"
                " sidecar starts, or set the sidecar's own key"
            )


def check_data_dir(config: AppConfig) -> None:
    """Make sure the data dir exists and takes files; ConfigError naming `data_dir` if not."""
    directory = config.data_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"invalid config key data_dir ({ENV_PREFIX}DATA_DIR): {directory} is not a writable"
            f" directory ({reason})"
        ) from exc
    _check_room_kept(config)


def _check_room_kept(config: AppConfig) -> None:
    """ConfigError when `spool.min_free_bytes` is not less than the data dir's whole
    filesystem: the spool would refuse every point as DISK_FULL, for good."""
    keep = config.spool.min_free_bytes
    stats = os.statvfs(config.data_dir)
    size = stats.f_blocks * stats.f_frsize
    if keep >= size:
        raise ConfigError(
            f"invalid config key spool.min_free_bytes ({ENV_PREFIX}SPOOL__MIN_FREE_BYTES):"
            f" {keep} bytes to keep free is not less than the {size} bytes of the data dir's"
            f" whole filesystem ({config.data_dir}): no metric point could ever be accepted"
        )


def check_ports(config: AppConfig) -> None:
    """Fail before anything loads when the gRPC or metrics port is taken (ConfigError naming
    the key); the listeners themselves still report a port lost to a race."""
    wanted = {
        "server.port": (config.server.host, config.server.port),
        "metrics.port": (config.metrics.host, config.metrics.port),
    }
    for key, (host, port) in wanted.items():
        if not port:
            continue
        env = ENV_PREFIX + key.replace(".", "__").upper()
        try:
            _free_on_every_address(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"invalid config key {key} ({env}): cannot listen on {host_port(host, port)}"
                f" ({reason})"
            ) from exc


def _free_on_every_address(host: str, port: int) -> None:
    """Raise OSError when `port` cannot be listened on at `host`'s first address, or is
    taken at any other (a name like `localhost` is 127.0.0.1 and ::1: gRPC listens on
    each it can, and a client of the name may reach whichever holds the port)."""
    found = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if host.lower() == "localhost":
        # gRPC's resolver takes `localhost` as both loopbacks, whatever /etc/hosts says.
        for loopback in ("127.0.0.1", "::1"):
            found += socket.getaddrinfo(loopback, port, type=socket.SOCK_STREAM)
    seen: set[tuple[object, ...]] = set()
    for index, (family, kind, proto, _name, address) in enumerate(found):
        if (family, *address[:2]) in seen:
            continue
        seen.add((family, *address[:2]))
        try:
            with socket.socket(family, kind, proto) as probe:
                # As the listeners do: a port in TIME_WAIT is free, one with a listener is not.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            # Another address of the name may be one this machine lacks (no IPv6).
            if index == 0 or exc.errno == errno.EADDRINUSE:
                raise


def redact_uri(uri: str) -> str:
    """The URI with any `user:password@` credentials replaced by `***@`, safe to log."""
    return redact(uri)


def describe(config: AppConfig) -> str:
    """One log line: embedded store or MLflow server, and the URIs, credentials redacted."""
    mlflow = config.mlflow
    if config.embedded:
        where = f"embedded MLflow store {redact_uri(config.tracking_uri)}"
        where += f", artifacts in {config.artifact_root}"
    else:
        where = f"MLflow server {redact_uri(config.tracking_uri)}"
    if config.registry_uri != config.tracking_uri:
        where += f", registry {redact_uri(config.registry_uri)}"
    credentials = [
        name
        for name, present in (
            ("username", bool(mlflow.username)),
            ("password", bool(mlflow.password.get_secret_value())),
            ("token", bool(mlflow.token.get_secret_value())),
        )
        if present
    ]
    if credentials:
        where += f" (credentials: {', '.join(credentials)}, values not shown)"
    return f"mode: {where}; data dir {config.data_dir}"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_files(config: AppConfig) -> None:
    named = {
        "tls.cert_file": config.tls.cert_file,
        "tls.key_file": config.tls.key_file,
        "tls.client_ca_file": config.tls.client_ca_file,
        "auth.tokens_file": config.auth.tokens_file,
    }
    for key, path in named.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"invalid config key {key}: {path} is not a readable file")
    _check_tls_files(config.tls)
    if config.auth.enabled and not config.auth.load_tokens():
        # Whichever was set: an empty token in auth.tokens, or a file of none.
        key = "auth.tokens_file" if config.auth.tokens_file is not None else "auth.tokens"
        raise ConfigError(
            f"invalid config key {key}: it holds no token (empty tokens are not tokens)"
        )


def _no_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal; grpc takes none.
    return b""


def _check_tls_files(tls: TlsConfig) -> None:
    """Refuse PEM files the listener could not use, naming the setting: grpc only says it
    failed to bind, which blames the port."""
    cert, key = tls.cert_file, tls.key_file
    if cert is None or key is None:
        return
    checks: list[tuple[str, Path, str, Callable[[ssl.SSLContext], None]]] = [
        (
            "tls.cert_file",
            cert,
            "is not a PEM certificate",
            lambda c: c.load_verify_locations(cert),
        ),
        (
            "tls.key_file",
            key,
            "is not the unencrypted PEM key of tls.cert_file",
            lambda c: c.load_cert_chain(cert, key, password=_no_password),
        ),
    ]
    ca = tls.client_ca_file
    if ca is not None:
        checks.append(
            (
                "tls.client_ca_file",
                ca,
                "holds no PEM CA certificate",
                lambda c: c.load_verify_locations(ca),
            )
        )
    for setting, path, problem, check in checks:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # Whether the files are usable at all, not this system's OpenSSL policy (which
        # refuses, say, a 1024-bit key): grpc's own TLS library serves with them.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        try:
            check(context)
        except (ssl.SSLError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"invalid config key {setting}: {path} {problem} ({_ssl_reason(exc)})"
            ) from None


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc).strip() or type(exc).__name__


def _listeners(config: AppConfig) -> list[tuple[str, str]]:
    """(setting, host) of every listener the sidecar opens."""
    listeners = [("server.host", config.server.host)]
    if config.metrics.port:
        listeners.append(("metrics.host", config.metrics.host))
    return listeners


def _check_bind_policy(config: AppConfig) -> None:
    """One rule for every listener: a non-loopback address needs protection, or
    `server.allow_insecure_remote: true`. The gRPC listener is protected by auth or TLS;
    /metrics checks no token, so only TLS (which it then speaks too) protects it."""
    if config.server.allow_insecure_remote:
        return
    for key, host in _listeners(config):
        if is_loopback(host):
            continue
        if key == "server.host" and not (config.auth.enabled or config.tls.enabled):
            raise ConfigError(
                f"invalid config key {key}: refusing to listen on {host}, a non-loopback"
                " address, without auth or TLS: set auth.tokens or tls.cert_file/key_file,"
                " or server.allow_insecure_remote: true"
            )
        if key == "metrics.host" and not config.tls.enabled:
            raise ConfigError(
                f"invalid config key {key}: refusing to serve metrics on {host}, a non-loopback"
                " address, without TLS (/metrics checks no token): set tls.cert_file/key_file,"
                " or server.allow_insecure_remote: true"
            )


def insecure_listener_warnings(config: AppConfig) -> list[str]:
    """What to warn about at start: bearer tokens sent in plaintext to a non-loopback
    listener can be read off the network."""
    if not config.auth.enabled or config.tls.enabled or is_loopback(config.server.host):
        return []
    return [
        f"bearer tokens (auth.tokens) travel in plaintext to {config.server.host}, a non-loopback"
        " address: anyone on the network can read them; set tls.cert_file/key_file"
    ]


def _check_env_names(environ: Mapping[str, str]) -> None:
    """Refuse `MLFLOW_SIDECAR_*` variables that name no setting (a typo would be ignored);
    the clients' `MLFLOW_SIDECAR_CLIENT_*` are theirs."""
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(_OWN_PREFIX) and not upper.startswith(ENV_PREFIX):
            if upper == CONFIG_FILE_ENV or upper.startswith(_CLIENT_PREFIX):
                continue
            if not is_service_link(name, environ[name]):
                raise ConfigError(_unknown_variable(name))
            continue
        if not upper.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        model: type[BaseModel] | None = AppConfig
        known_path: list[str] = []
        for index, part in enumerate(parts):
            fields = model.model_fields if model is not None else {}
            if part not in fields:
                rest = parts[index + 1 :]
                raise ConfigError(_unknown_env(name, known_path, part, rest, sorted(fields)))
            known_path.append(part)
            annotation = fields[part].annotation
            section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            model = annotation if section and isinstance(annotation, type) else None


def _unknown_variable(name: str) -> str:
    """The refusal of an `MLFLOW_SIDECAR_` variable that is neither the config file's nor a
    setting's (`MLFLOW_SIDECAR__<SECTION>__<KEY>`, two underscores after the prefix)."""
    rest = name[len(_OWN_PREFIX) :].lstrip("_")
    if difflib.get_close_matches(rest.upper(), ["CONFIG"], n=1):
        hint = f"did you mean {CONFIG_FILE_ENV}?"
    else:
        hint = f"settings are {ENV_PREFIX}<SECTION>__<KEY>: did you mean {ENV_PREFIX}{rest}?"
    return f"unknown variable {name}: {hint}"


def _unknown_env(
    name: str, known_path: list[str], part: str, rest: list[str], choices: list[str]
) -> str:
    where = ".".join(known_path) or "the top level"
    hint = _close_key_hint(
        part, choices, lambda close: ENV_PREFIX + "__".join([*known_path, close, *rest]).upper()
    )
    return f"unknown setting {name}: {where} has no key {part!r}{hint}"


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """The refusal of a key in the config file (or the overrides) that names no setting.
    Its value is never shown: a misspelt `pasword` or `token` holds a secret all the same."""
    *parents, part = (str(item) for item in loc)
    model: Any = AppConfig
    for parent in parents:
        model = getattr(model, "model_fields", {}).get(parent)
        model = getattr(model, "annotation", None)
    choices = sorted(getattr(model, "model_fields", {}))
    where = ".".join(parents) or "the top level"
    hint = _close_key_hint(part, choices, lambda close: ".".join([*parents, close]))
    return f"unknown config key {'.'.join([*parents, part])}: {where} has no key {part!r}{hint}"


def _close_key_hint(part: str, choices: list[str], spell: Callable[[str], str]) -> str:
    """A hint naming the known key closest to `part` (spelt by `spell`), else the known keys."""
    close = difflib.get_close_matches(part, choices, n=1)
    if close:
        return f"; did you mean {spell(close[0])}?"
    if choices:
        return f"; known: {', '.join(choices)}"
    return ""


def _yaml_problem(exc: BaseException) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the config key at `loc`: a bad value that came in
    through MLflow's own variable is named as that variable."""
    env = ENV_PREFIX + "__".join(str(part).upper() for part in loc)
    if os.environ.get(env) or len(loc) != 2 or loc[0] != "mlflow":
        return env
    for mlflow_env, field in MLFLOW_ENV_KEYS.items():
        if field == loc[1] and field in _mlflow_env_values():
            env = mlflow_env
    return env


def _is_secret(loc: tuple[int | str, ...]) -> bool:
    """Whether the setting at `loc` holds secrets (SecretStr): its input is never shown."""
    model: Any = AppConfig
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return False
        model = fields[part].annotation
        if _mentions_secret(model):
            return True
    return False


def _mentions_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_mentions_secret(arg) for arg in get_args(annotation))


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    more = f"; and {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden" and loc:
        return _unknown_key(loc) + more
    key = ".".join(str(part) for part in loc) or "<root>"
    env = _env_name(loc)
    value = first.get("input")
    if _is_secret(loc):
        # README: tokens and passwords are never logged, also when given the wrong shape.
        shown = " (value not shown: it is secret)"
    elif isinstance(value, dict):
        shown = ""
    else:
        shown = f" (got {value!r})"
    return f"invalid config key {key} ({env}): {first['msg']}{shown}{more}"
