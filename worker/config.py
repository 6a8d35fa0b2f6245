"""Worker settings: one pydantic-settings class with a section per stage.

Precedence, highest first: environment variables (``CXR_<SECTION>__<KEY>``, lists
as JSON), command-line flags, the TOML config file, the defaults below. Bad values
are refused at start-up with the key, the value and the reason.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from worker.errors import ConfigError

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash
_DEST_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@\s]+):(?P<port>\d{1,5})$")


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"not a valid AE title (1-16 characters, no backslash): {value!r}")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Destination(_Section):
    """A C-STORE destination: the PACS that receives our results."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DEST_RE.match(text.strip())
        if not m:
            raise ValueError(f"destination must be AET@HOST:PORT, received {text!r}")
        return cls(ae_title=_check_ae(m["ae"]), host=m["host"], port=int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DicomSection(_Section):
    ae_title: str = "CXR-GRADCAM"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_pdu: int = Field(262_144, ge=0, description="largest PDU we accept; 0 = unlimited")
    max_associations: int = Field(10, ge=1)
    max_associations_per_peer: int = Field(4, ge=1)
    pdu_deadline_s: float = Field(60.0, gt=0, description="absolute time to receive one PDU")
    association_deadline_s: float = Field(3600.0, gt=0, description="absolute lifetime of an association")
    max_dataset_mb: int = Field(512, ge=1, description="larger data sets are refused")
    shutdown_grace_s: float = Field(30.0, ge=0, description="SIGTERM: time for open associations to finish")
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class SpoolSection(_Section):
    dir: Path = Path("var/spool")
    reserve_mb: int = Field(512, ge=0, description="C-STORE answers out-of-resources below this")


class ModelSection(_Section):
    path: Path | None = None
    providers: Literal["auto", "cuda", "cpu"] = "auto"
    batch_size: int = Field(8, ge=1, le=256)
    batch_wait_ms: int = Field(200, ge=0)
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = its default")
    ood_action: Literal["withhold", "flag"] = Field(
        "withhold", description="an image outside the training distribution: no answer, or an answer labelled so")
    faithfulness: bool = Field(True, description="score each heatmap with one extra batched model run")


class SelectSection(_Section):
    modalities: list[str] = ["CR", "DX"]
    body_parts: list[str] = ["CHEST"]
    allow_missing_body_part: bool = True
    view_positions: list[str] = ["PA", "AP"]
    allow_missing_view_position: bool = True
    excluded_image_types: list[str] = ["LOCALIZER"]
    min_size: int = Field(256, ge=1, description="shorter side, pixels")
    max_pixels: int = Field(50_000_000, ge=1, description="Rows x Columns above this are refused")
    skip_for_processing: bool = Field(True, description="skip DX For Processing (raw detector) images")


class OutputSection(_Section):
    manufacturer: str = "cxr-gradcam"
    institution_name: str | None = None
    sc_series_number: int = Field(9001, ge=0)
    sc_series_description: str = Field("AI Grad-CAM Pneumonia", max_length=64)
    sr_series_number: int = Field(9002, ge=0)
    sr_series_description: str = Field("AI Pneumonia Report", max_length=64)
    opacity: float = Field(0.4, ge=0.0, le=1.0)
    heatmap_for_negative: bool = Field(False, description="paint the heatmap of a negative decision too")
    uid_prefix: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)*\.$", max_length=40)


class SendSection(_Section):
    destinations: list[Destination] = []
    retry_initial_s: float = Field(10.0, gt=0)
    retry_max_interval_s: float = Field(1800.0, gt=0)
    retry_horizon_h: float = Field(24.0, gt=0, description="give up (dead letter) after this long")
    dimse_timeout: float = Field(60.0, gt=0)
    acse_timeout: float = Field(30.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return [Destination.parse(v) if isinstance(v, str) else v for v in value]


class SecuritySection(_Section):
    """Access control and DICOM TLS (BCP 195: TLS 1.2 or newer)."""

    allowed: list[str] = Field(default_factory=list, description="AE@CIDR entries; empty allows every caller")
    tls_port: int | None = Field(None, ge=1, le=65535, description="a second listener that speaks only TLS")
    tls_only: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False
    send_tls: bool = False

    @field_validator("allowed")
    @classmethod
    def _check_allowed(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            ae, sep, network = entry.partition("@")
            _check_ae(ae)
            if sep:
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError:
                    raise ValueError(f"allowed entry {entry!r}: {network!r} is not an IP network") from None
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> SecuritySection:
        wants_tls = self.tls_port is not None or self.tls_only or self.send_tls
        if wants_tls and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("TLS needs tls_cert and tls_key")
        if self.send_tls and self.tls_ca is None:
            raise ValueError("send_tls needs tls_ca: the PACS certificate is verified against it, not the system CAs")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise ValueError("tls_require_client_cert needs tls_ca (the CA that signs client certificates)")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return self


class MetricsSection(_Section):
    """Prometheus metrics, /healthz and /readyz over HTTP."""

    port: int = Field(9108, ge=0, le=65535, description="0 switches the HTTP endpoint off")
    bind: str = "127.0.0.1"
    echo_cache_s: float = Field(30.0, ge=0, description="how long a C-ECHO of a destination counts for /readyz")


class AuditSection(_Section):
    """Audit trail: JSON lines modelled on DICOM PS3.15 A.5 audit messages."""

    path: Path = Path("var/audit.jsonl")


class LogSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class Settings(BaseSettings):
    """Everything the worker reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="CXR_", env_nested_delimiter="__", extra="forbid")

    dicom: DicomSection = DicomSection()
    spool: SpoolSection = SpoolSection()
    model: ModelSection = ModelSection()
    select: SelectSection = SelectSection()
    output: OutputSection = OutputSection()
    send: SendSection = SendSection()
    security: SecuritySection = SecuritySection()
    metrics: MetricsSection = MetricsSection()
    audit: AuditSection = AuditSection()
    log: LogSection = LogSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: an operator's override beats the file and the flags.
        return (env_settings, init_settings)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if value is None:
            continue
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def get_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the TOML file (when given), lay the flags on top, then the environment.

    Raises:
        ConfigError: one line naming the key, the bad value and why.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = _merge(data, overrides or {})
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        env = "CXR_" + "__".join(str(p) for p in err["loc"][:2]).upper()
        source = path or "flags/environment"
        raise ConfigError(
            f"{source}: {where}: {err['msg']} (received {err.get('input')!r}; environment {env})"
        ) from None
