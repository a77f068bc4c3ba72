"""`ClientSettings`: how a trainer reaches its sidecar."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlflow_sidecar.client.metric_stream import (
    DEFAULT_MAX_BUFFERED_POINTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RECONNECT_S,
)
from mlflow_sidecar.client.tls_files import check_tls_files
from mlflow_sidecar.core import bearer_tokens
from mlflow_sidecar.core.grpc_targets import check_target
from mlflow_sidecar.core.limits import (
    CHUNK_FRAMING_BYTES,
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
)
from mlflow_sidecar.core.service_links import is_service_link
from mlflow_sidecar.core.settings_model import NumbersRefuseBooleans

TLS_FILE_SETTINGS = ("root_certificates_file", "client_cert_file", "client_key_file")
"""The settings that name PEM files of a TLS channel; each needs `tls`."""


class ClientSettingFields(NumbersRefuseBooleans):
    """Each of the client's settings on its own, without the checks of one setting against
    another that `ClientSettings` adds: what one source (the environment) gives may be
    completed by another (a `sidecar+tls://` URI, the container's config)."""

    # A refusal never echoes what it was given: model-level ones echo every setting, the
    # token among them.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    # `inf` keeps a stream trying through any sidecar restart (documented).
    _UNBOUNDED_DURATIONS: ClassVar[frozenset[str]] = frozenset({"stream_reconnect_s"})

    # Empty or blank, grpc fails every call with INTERNAL "target uri is not valid".
    target: str = Field(
        "127.0.0.1:50051", pattern=r"^\S+$", description="host:port or a gRPC target URI"
    )
    timeout_s: float = Field(30.0, gt=0, description="default deadline of every call")
    max_attempts: int = Field(5, ge=1, le=5, description="tries of a call that got UNAVAILABLE")
    # The sidecar's own bound: a channel argument past 2**31 - 1 would fail every call.
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    tls: bool = False
    root_certificates_file: str = Field("", description="PEM CA bundle; empty: system roots")
    client_cert_file: str = Field("", description="PEM client certificate, for mTLS")
    client_key_file: str = Field("", description="PEM key of the client certificate")
    token: str = Field("", description="bearer token sent as `authorization` metadata")
    transfer_timeout_s: float = Field(
        3600.0, gt=0, description="deadline of one artifact or model upload or download"
    )
    chunk_bytes: int | None = Field(
        None,
        ge=MIN_CHUNK_BYTES,
        le=MAX_CHUNK_BYTES,
        description="bytes per message of an upload; must fit max_message_bytes."
        " Unset: 1 MiB, or less when max_message_bytes is smaller",
    )
    stream_reconnect_s: float = Field(
        DEFAULT_RECONNECT_S,
        ge=0,
        allow_inf_nan=True,
        description="how long a metric stream or an alias watch keeps trying to reach the"
        " sidecar before it gives up with UnavailableError (reason SIDECAR_UNREACHABLE); 0"
        " gives up at the first failed call, a large value (or inf) outlasts any sidecar"
        " restart",
    )
    model_cache_dir: str = Field(
        "",
        description="where this process sees the sidecar's model cache directory"
        " (<data_dir>/models) through a volume they share (read-only is enough): model"
        " downloads then copy cached versions from there, verified against their sha256s,"
        " instead of receiving the bytes over gRPC; empty: always over gRPC",
    )
    stream_buffer_points: int = Field(
        DEFAULT_MAX_BUFFERED_POINTS,
        ge=1,
        description="the most points a metric stream holds in the trainer's memory before"
        " the sidecar accepted them",
    )
    stream_when_full: Literal["block", "raise"] = Field(
        "block",
        description="what `log` does when the stream's buffer is full: `block` waits for"
        " room (until the stream gives up after stream_reconnect_s); `raise` raises"
        " ResourceExhaustedError (reason CLIENT_BUFFER_FULL) and keeps nothing of that call",
    )

    @field_validator("target")
    @classmethod
    def _target_grpc_reaches(cls, target: str) -> str:
        return check_target(target)

    @field_validator("token")
    @classmethod
    def _token_fits_a_header(cls, token: str) -> str:
        # grpc refuses such metadata at every call with a bare INTERNAL "Invalid metadata".
        if not bearer_tokens.sendable(token):
            raise ValueError(
                f"token {bearer_tokens.UNSENDABLE} (value not shown): strip it, e.g. the"
                " newline a token read from a file ends with"
            )
        return token


class ClientSettings(ClientSettingFields):
    """How a trainer reaches its sidecar."""

    @model_validator(mode="after")
    def _client_certificate_with_its_key(self) -> ClientSettings:
        # grpc's core aborts the whole process on a certificate without its key (or the
        # reverse): refused here, naming what is missing.
        if bool(self.client_cert_file) != bool(self.client_key_file):
            given, missing = (
                ("client_cert_file", "client_key_file")
                if self.client_cert_file
                else ("client_key_file", "client_cert_file")
            )
            raise ValueError(f"{given} is set without {missing}: mTLS needs both")
        return self

    @model_validator(mode="after")
    def _tls_files_with_tls(self) -> ClientSettings:
        # Without tls the channel is plaintext and would never read them: a forgotten
        # `tls: true` must not send calls (and the token) in the clear.
        if self.tls:
            return self
        for name in TLS_FILE_SETTINGS:
            if getattr(self, name):
                raise ValueError(
                    f"{name} is set but tls is not: the channel would be plaintext and the"
                    " file unused; set tls: true (MLFLOW_SIDECAR_CLIENT_TLS=true, or a"
                    f" sidecar+tls:// URI), or unset {name}"
                )
        return self

    @model_validator(mode="after")
    def _tls_files_are_pem(self) -> ClientSettings:
        if self.tls:
            check_tls_files(
                self.root_certificates_file, self.client_cert_file, self.client_key_file
            )
        return self

    @model_validator(mode="after")
    def _chunks_fit_messages(self) -> ClientSettings:
        if (
            self.chunk_bytes is not None
            and self.chunk_bytes + CHUNK_FRAMING_BYTES > self.max_message_bytes
        ):
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) plus {CHUNK_FRAMING_BYTES} bytes of framing"
                f" must fit max_message_bytes ({self.max_message_bytes})"
            )
        return self

    @property
    def upload_chunk_bytes(self) -> int:
        """The chunk size uploads use: `chunk_bytes`, or the largest that fits by default."""
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        return min(DEFAULT_CHUNK_BYTES, self.max_message_bytes - CHUNK_FRAMING_BYTES)

    @property
    def download_chunk_bytes(self) -> int:
        """The most a download's chunk may carry to fit `max_message_bytes`: the sidecar is
        asked for chunks no larger (its own are 1 MiB by default)."""
        return min(MAX_CHUNK_BYTES, self.max_message_bytes - CHUNK_FRAMING_BYTES)

    @property
    def metric_message_bytes(self) -> int:
        """The largest message a metric stream sends: 1 MiB, or less to fit
        `max_message_bytes`."""
        return min(DEFAULT_MAX_MESSAGE_BYTES, self.max_message_bytes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> ClientSettings:
        """Settings from a (possibly partial) mapping; unset or None keys take defaults."""
        return cls(**{k: v for k, v in (values or {}).items() if v is not None})


ENV_PREFIX = "MLFLOW_SIDECAR_CLIENT_"
# What every variable of the project's starts with: the clients' go on with CLIENT_, the
# sidecar's settings with a second underscore, and its config file is CONFIG_FILE_ENV.
_PROJECT_PREFIX = "MLFLOW_SIDECAR_"
_SIDECAR_PREFIX = "MLFLOW_SIDECAR__"
CONFIG_FILE_ENV = "MLFLOW_SIDECAR_CONFIG"


class ClientEnvSettings(ClientSettingFields, BaseSettings):
    """The client's settings read from `MLFLOW_SIDECAR_CLIENT_*` environment variables; one
    that names no setting, or any other `MLFLOW_SIDECAR_*` variable that is not the
    sidecar's, is a ValueError (a typo would otherwise be ignored). Each value is checked
    here; how they go together is checked by `ClientSettings`, once they are merged with
    the settings of the other sources."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    def __init__(self, **values: Any) -> None:
        check_env_names(os.environ)
        super().__init__(**values)


def check_env_names(environ: Mapping[str, str]) -> None:
    """ValueError for an `MLFLOW_SIDECAR_*` variable that is neither a client setting
    (`MLFLOW_SIDECAR_CLIENT_<KEY>`) nor the sidecar's (`MLFLOW_SIDECAR__<SECTION>__<KEY>`,
    `MLFLOW_SIDECAR_CONFIG`), which a trainer's environment may hold too."""
    known = sorted(ClientSettings.model_fields)
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(_PROJECT_PREFIX):
            continue
        if upper.startswith(_SIDECAR_PREFIX) or upper == CONFIG_FILE_ENV:
            continue
        if is_service_link(name, environ[name]):
            continue
        if upper.startswith(ENV_PREFIX) and upper[len(ENV_PREFIX) :].lower() in known:
            continue
        kind = "client setting" if upper.startswith(ENV_PREFIX) else "variable"
        raise ValueError(f"unknown {kind} {name}: {_hint(upper, known)}")


def _hint(name: str, known: list[str]) -> str:
    """The variable `name` most likely meant: a client key misspelt after a right prefix,
    else a misspelt prefix (`CLEINT_`, `CLIENTTARGET`) or config file variable."""
    if name.startswith(ENV_PREFIX):
        rest, choices = name[len(ENV_PREFIX) :], [key.upper() for key in known]
        prefix = ENV_PREFIX
    else:
        rest = name[len(_PROJECT_PREFIX) :]
        choices = [f"CLIENT_{key.upper()}" for key in known] + ["CONFIG"]
        prefix = _PROJECT_PREFIX
    close = difflib.get_close_matches(rest, choices, n=1)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    return (
        f"client settings are {ENV_PREFIX}<KEY>, KEY one of {known}; the sidecar's are"
        f" {_SIDECAR_PREFIX}<SECTION>__<KEY> and {CONFIG_FILE_ENV}"
    )
