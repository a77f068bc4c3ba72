"""`ClientSettings`: how a trainer reaches its sidecar."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseModel):
    """How a trainer reaches its sidecar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = "127.0.0.1:50051"
    timeout_s: float = Field(30.0, gt=0, description="default deadline of every call")
    max_attempts: int = Field(5, ge=1, le=5, description="tries of a call that got UNAVAILABLE")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    tls: bool = False
    root_certificates_file: str = Field("", description="PEM CA bundle; empty: system roots")
    client_cert_file: str = Field("", description="PEM client certificate, for mTLS")
    client_key_file: str = Field("", description="PEM key of the client certificate")
    token: str = Field("", description="bearer token sent as `authorization` metadata")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> ClientSettings:
        """Settings from a (possibly partial) mapping; unset or None keys take defaults."""
        return cls(**{k: v for k, v in (values or {}).items() if v is not None})


class ClientEnvSettings(ClientSettings, BaseSettings):
    """`ClientSettings` read from `MLFLOW_SIDECAR_CLIENT_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MLFLOW_SIDECAR_CLIENT_", extra="ignore")
