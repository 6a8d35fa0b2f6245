"""Worker settings: one pydantic-settings class with a section per stage.

Precedence, highest first: environment variables (``CXR_<SECTION>__<KEY>``, lists
as JSON), command-line flags, the TOML config file, the defaults below. Bad values
are refused at start-up with the key, the value and the reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from worker.errors import ConfigError

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash
_URL_RE = re.compile(r"^\s*https?://", re.IGNORECASE)
_MLLP_RE = re.compile(r"^\s*mllps?://", re.IGNORECASE)
_DEST_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@\s]+):(?P<port>\d{1,5})$")


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"not a valid AE title (1-16 characters, no backslash): {value!r}")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Destination(_Section):
    """A C-STORE destination: the PACS that receives our results."""

    ae_title: str = Field(description="the PACS's AE title (1-16 characters)")
    host: str = Field(description="its host name or IP address")
    port: int = Field(ge=1, le=65535, description="its DICOM port")

    # Validated here, not only in parse(): a TOML inline table {ae_title = ...} skips parse().
    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DEST_RE.match(text.strip())
        if not m:
            raise ValueError(f"destination must be AET@HOST:PORT or a DICOMweb https:// URL, received {text!r}")
        return cls(ae_title=_check_ae(m["ae"]), host=m["host"], port=int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DicomWebDestination(_Section):
    """A DICOMweb destination: STOW-RS to ``url`` (the service's base URL, e.g.
    ``https://pacs.example.org/dicom-web``), with credentials read from a file or an
    environment variable, never from the configuration itself."""

    url: str = Field(description="the DICOMweb base URL; STOW-RS posts to {url}/studies")
    auth: Literal["none", "basic", "bearer"] = Field("none", description="HTTP authentication: none, basic "
                                                     "(USER:PASSWORD) or bearer (a token)")
    credentials_file: Path | None = Field(None, description="a file with the credentials: basic: one line "
                                          "USER:PASSWORD; bearer: the token (read at each request)")
    credentials_env: str | None = Field(None, description="the name of an environment variable that holds "
                                        "the credentials instead")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("DICOMweb destination must be http(s)://HOST[:PORT]/PATH, received "
                             f"{shown_url(value)!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"DICOMweb destination {shown_url(value)!r}: credentials in the URL are refused; "
                             "use credentials_file or credentials_env")
        if parts.query or parts.fragment:
            raise ValueError(f"DICOMweb destination {shown_url(value)!r}: a base URL has no query or fragment "
                             "(credentials go in credentials_file or credentials_env)")
        try:
            parts.port  # noqa: B018 (raises on a port out of range)
        except ValueError:
            raise ValueError(f"DICOMweb destination {shown_url(value)!r}: port out of range") from None
        return value.strip().rstrip("/")

    @model_validator(mode="after")
    def _check_credentials(self) -> DicomWebDestination:
        sources = [s for s in (self.credentials_file, self.credentials_env) if s is not None]
        if self.auth == "none":
            if sources:
                raise ValueError(f"{self.url}: credentials given but auth = 'none'; set auth = 'basic' or 'bearer'")
            return self
        if len(sources) != 1:
            raise ValueError(f"{self.url}: auth = {self.auth!r} needs exactly one of credentials_file, "
                             "credentials_env")
        self.secret()  # refuse at start-up what every request would fail with
        return self

    def secret(self) -> str:
        """The credentials, read now (so that a rotated file or token is picked up).

        Raises:
            ValueError: missing, empty or malformed; the message never quotes the secret.
        """
        if self.credentials_file is not None:
            try:
                text = Path(self.credentials_file).read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{self.url}: credentials_file {self.credentials_file}: "
                                 f"{type(exc).__name__}") from None
            where = f"credentials_file {self.credentials_file}"
        else:
            text = os.environ.get(str(self.credentials_env), "").strip()
            where = f"credentials_env {self.credentials_env}"
        if not text:
            raise ValueError(f"{self.url}: {where} is empty or not set")
        if self.auth == "basic" and (":" not in text or "\n" in text):
            raise ValueError(f"{self.url}: {where} must hold one line USER:PASSWORD for auth = 'basic'")
        if self.auth == "bearer" and any(c.isspace() for c in text):
            raise ValueError(f"{self.url}: {where} must hold one token without spaces for auth = 'bearer'")
        try:  # HTTP sends both in an ISO-8859-1 header; requests would fail mid-request otherwise
            text.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{self.url}: {where} holds characters outside ISO-8859-1 (Latin-1), "
                             "which HTTP Basic and Bearer credentials cannot carry") from None
        return text

    @property
    def host(self) -> str:
        return str(urlsplit(self.url).hostname)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.url


class Hl7Destination(_Section):
    """An HL7 v2 destination (the RIS): ORU^R01 messages over MLLP, ``mllp://HOST:PORT``, or
    ``mllps://HOST:PORT`` for MLLP inside TLS (1.2 or newer, the server verified against
    ``tls_ca``, or the system's CAs when unset)."""

    mllp: str = Field(description="mllp://HOST:PORT or mllps://HOST:PORT (TLS); 2575 is MLLP's registered port")
    tls_ca: Path | None = Field(None, description="CA bundle that signs the server's certificate (mllps:// only)")
    timeout_s: float = Field(30.0, gt=0, description="seconds to connect and to wait for the ACK; a timeout is "
                             "retried like a network error")

    @field_validator("mllp")
    @classmethod
    def _check_mllp(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme.lower() not in ("mllp", "mllps") or not parts.hostname or port is None \
                or parts.path not in ("", "/") or parts.username is not None:
            raise ValueError(f"HL7 destination must be mllp://HOST:PORT or mllps://HOST:PORT, received {value!r}")
        return f"{parts.scheme.lower()}://{parts.hostname}:{port}"

    @model_validator(mode="after")
    def _check_tls(self) -> Hl7Destination:
        if self.tls_ca is not None and not self.tls:
            raise ValueError(f"{self.mllp}: tls_ca is set but the scheme is mllp://; use mllps:// for TLS")
        if self.tls_ca is not None:
            import ssl

            if not self.tls_ca.is_file():
                raise ValueError(f"{self.mllp}: tls_ca file not found: {self.tls_ca}")
            try:  # the outbox builds its TLS context at start: a bad bundle is a config error, named here
                ssl.create_default_context(cafile=str(self.tls_ca))
            except (ssl.SSLError, ValueError, OSError) as exc:
                raise ValueError(f"{self.mllp}: tls_ca {self.tls_ca} is not a PEM CA bundle: {exc}") from None
        return self

    @property
    def tls(self) -> bool:
        return self.mllp.startswith("mllps://")

    @property
    def host(self) -> str:
        return str(urlsplit(self.mllp).hostname)

    @property
    def port(self) -> int:
        return int(urlsplit(self.mllp).port or 0)

    def __str__(self) -> str:
        return self.mllp


def redact(text: str) -> str:
    """``text`` with the USER:PASSWORD of any URL in it replaced, for error messages."""
    return re.sub(r"(https?://)[^/@]*@", r"\1***@", str(text), flags=re.IGNORECASE)


def shown_url(value: str) -> str:
    """A URL as messages may show it: the parsed scheme, host, port and path only (never its
    user, password, query or fragment, which may hold credentials such as ``?apikey=``)."""
    try:
        parts = urlsplit(str(value).strip())
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _shown_input(value: Any) -> str:
    """A rejected input for an error message, with any URL in it shown by :func:`shown_url`."""
    if isinstance(value, str) and _URL_RE.match(value):
        return repr(shown_url(value))
    if isinstance(value, dict):
        return repr({k: shown_url(v) if isinstance(v, str) and _URL_RE.match(v) else v for k, v in value.items()})
    if isinstance(value, list):
        return "[" + ", ".join(_shown_input(v) for v in value) + "]"
    return repr(value)


def parse_destination(text: str) -> Destination | DicomWebDestination | Hl7Destination:
    """``AET@HOST:PORT`` (C-STORE), ``http(s)://HOST[:PORT]/PATH`` (DICOMweb STOW-RS, no credentials)
    or ``mllp(s)://HOST:PORT`` (HL7 ORU^R01).

    Raises:
        ValueError: one line, naming the value.
    """
    if _MLLP_RE.match(text):
        try:
            return Hl7Destination(mllp=text)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    if not _URL_RE.match(text):
        return Destination.parse(text)
    try:
        return DicomWebDestination(url=text)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


class DicomSection(_Section):
    """The DICOM listener (C-STORE SCP) and the limits every calling peer meets."""

    ae_title: str = Field("CXR-GRADCAM", description="our AE title, the one the PACS calls (1-16 characters)")
    bind: str = Field("0.0.0.0", description="address the listener binds; every interface by default, "
                      "since a PACS on another host calls it")
    port: int = Field(11112, ge=1, le=65535, description="DICOM port; 11112 (the registered DICOM port above "
                      "1024) needs no root")
    max_pdu: int = Field(262_144, ge=0, description="largest PDU we announce and accept, in bytes (at least "
                         "64 KiB); a longer one closes the connection when its header arrives. 0 = unlimited "
                         "(then max_dataset_mb bounds it)")
    max_associations: int = Field(10, ge=1, description="associations open at once, from all peers; above it "
                                  "a connection is closed at accept (a PACS rarely opens more than a few)")
    max_associations_per_peer: int = Field(4, ge=1, description="associations open at once from one IP "
                                           "address, so one peer cannot take every slot")
    pdu_deadline_s: float = Field(60.0, gt=0, description="seconds to receive one PDU, however slowly the "
                                  "peer trickles it")
    association_deadline_s: float = Field(3600.0, gt=0, description="seconds an association may last in all")
    max_dataset_mb: int = Field(512, ge=1, description="largest C-STORE data set, in MB (a deflated one by "
                                "its inflated size); larger ones are answered C000. 512 MB is far above any "
                                "chest radiograph")
    max_buffer_kb: int = Field(1024, ge=64, description="a command set, or a data set that cannot be streamed "
                               "to disk, larger than this many KiB aborts the association")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, seconds open associations get to "
                                    "finish before the worker stops")
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for association messages, including "
                                "the A-ASSOCIATE-RQ of a new connection")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for a DIMSE message within an "
                                 "association")
    network_timeout: float = Field(60.0, gt=0, description="seconds without any network traffic before an "
                                   "association is closed")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class SpoolSection(_Section):
    """The durable queue on disk: received instances, work in progress, outbox, dead letters."""

    dir: Path = Field(Path("var/spool"), description="spool folder (relative to the working directory); "
                      "use a persistent volume in production")
    reserve_mb: int = Field(512, ge=0, description="free MB kept on the spool's disk: below it C-STORE "
                            "answers A700 (out of resources); below half of it outputs are not written")
    max_crashes: int = Field(3, ge=0, description="an instance the worker died on this many times is "
                             "quarantined (a poison pill); 0 = never")
    done_retention_days: float = Field(30.0, gt=0, description="days the done/ markers (duplicate detection) "
                                       "are kept; a PACS re-sends within days, not months")
    quarantine_retention_days: float = Field(
        30.0, gt=0, description="days a file stays in quarantine/ and dead/ (whole DICOM files with PHI, kept for "
        "a look at what failed) before it is deleted; default as the results' retention. "
        "CXR_SPOOL__QUARANTINE_RETENTION_DAYS")


class ModelSection(_Section):
    """The ONNX model and how ONNX Runtime runs it."""

    path: Path | None = Field(None, description="the exported ONNX model (cxr-train export); required",
                              examples=["/var/lib/cxr-gradcam/model.onnx"])
    providers: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when usable, else the CPU; cuda: warns when it falls back to the CPU; "
        "cpu: never the GPU")
    batch_size: int = Field(8, ge=1, le=256, description="images per model run; 8 fills a CPU's cores without "
                            "holding many images in memory")
    batch_wait_ms: int = Field(200, ge=0, description="milliseconds to wait for a fuller batch, only while a "
                               "peer's association is open (a lone study is not held)")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = its default (one per core)")
    ood_action: Literal["withhold", "flag"] = Field(
        "withhold", description="an image outside the training distribution: withhold = no answer; "
        "flag = answer, labelled as outside")
    faithfulness: bool = Field(True, description=(
        "state whether the model depends on the region each drawn heatmap points at (positives; negatives "
        "with output.heatmap_for_negative): one extra batched run of 9 perturbed inputs per such image; needs "
        "the faithfulness cut-off export stores"))
    # The CUDA path (docs/install.md, GPU); auto = on where the CUDA provider runs.
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto", description="run through an ONNX Runtime I/O binding (one copy to the device and back); "
        "auto = on with CUDA")
    pad_batches: Literal["auto", "on", "off"] = Field(
        "auto", description="pad runs to exactly batch_size, so CUDA chooses its convolution algorithms "
        "once; auto = on with CUDA")
    probe_check: Literal["refuse", "fallback", "off"] = Field(
        "refuse", description="what to do when a reduced-precision (int8/fp16) model answers the probe inputs "
        "stored in it, on this machine, outside the limits its export verified against fp32 (int8 kernels differ "
        "between CPUs): refuse to start (the default: no answer is better than an unverified one), fallback (load "
        "fallback_path instead, with a warning and the cxr_model_probe_fallback metric at 1) or off (no check). "
        "Env CXR_MODEL__PROBE_CHECK")
    fallback_path: Path | None = Field(
        None, description="the fp32 model loaded when probe_check = fallback and the model fails its probe check; "
        "required by fallback, none by default. Env CXR_MODEL__FALLBACK_PATH")

    @model_validator(mode="after")
    def _fallback_named(self) -> ModelSection:
        if self.probe_check == "fallback" and self.fallback_path is None:
            raise ValueError("model.probe_check = 'fallback' needs model.fallback_path (an fp32 model)")
        return self
    site_prevalence: float | None = Field(
        None, ge=0.001, le=0.999,
        description="share of this site's images that show pneumonia (0.001-0.999, a fraction, e.g. 0.1 for "
                    "10%): the probability is reported at it by the prior-shift correction and the threshold "
                    "moves with it (decisions unchanged); unset = the model's own (the prevalence of the split "
                    "it was calibrated on, or its site calibration's), since only the site knows its own; "
                    "CXR_MODEL__SITE_PREVALENCE")
    target_sensitivity: float | None = Field(
        None, gt=0.0, le=1.0,
        description="choose the decision threshold for this sensitivity (a fraction) on the model's validation "
                    "split (or its site calibration's images) instead of keeping its operating point; unset = "
                    "keep it, the one its makers chose; CXR_MODEL__TARGET_SENSITIVITY")


class SelectSection(_Section):
    """Which received instances the model reads; the others are acknowledged and skipped."""

    modalities: list[str] = Field(["CR", "DX"], description="Modality values read (radiographs)")
    body_parts: list[str] = Field(["CHEST"], description="Body Part Examined values read")
    allow_missing_body_part: bool = Field(True, description="read an image without Body Part Examined "
                                          "(many CR chests lack it)")
    view_positions: list[str] = Field(["PA", "AP"], description="View Position values read (frontal views: "
                                      "the model was trained on them)")
    allow_missing_view_position: bool = Field(True, description="read an image without View Position")
    excluded_image_types: list[str] = Field(["LOCALIZER"], description="Image Type values never read")
    min_size: int = Field(256, ge=1, description="shorter side in pixels below which an image is skipped "
                          "(a thumbnail, not a radiograph)")
    # 5000 x 5000: a 43 x 43 cm detector at 86 um, above any chest radiograph; memory per
    # image grows with it (docs/operations.md, limits).
    max_pixels: int = Field(25_000_000, ge=1, description="Rows x Columns above this are quarantined before "
                            "decoding; 5000 x 5000 is above any chest detector")
    skip_for_processing: bool = Field(True, description="skip DX For Processing images (raw detector data the "
                                      "model was not trained on)")
    min_patient_age: float | None = Field(
        None, ge=0, le=150,
        description="skip images of patients younger than this, in years, read from PatientAge (0010,1010); "
                    "an image without a readable age is answered. Unset (off) by default because the model's "
                    "training data sets the right limit (ChestX-ray14 is mostly adults: 18 suits it); "
                    "CXR_SELECT__MIN_PATIENT_AGE")


class OutputSection(_Section):
    """What the Secondary Capture and the SR carry and look like."""

    manufacturer: str = Field("cxr-gradcam", description="Manufacturer of the SC and SR")
    institution_name: str | None = Field(None, description="Institution Name of the SC and SR; none by default",
                                         examples=["General Hospital"])
    sc_series_number: int = Field(9001, ge=0, description="Series Number of the SC series (high, to sort "
                                  "after the acquired series)")
    sc_series_description: str = Field("AI Grad-CAM Pneumonia", max_length=64,
                                       description="Series Description of the SC series")
    sr_series_number: int = Field(9002, ge=0, description="Series Number of the SR series")
    sr_series_description: str = Field("AI Pneumonia Report", max_length=64,
                                       description="Series Description of the SR series")
    opacity: float = Field(0.4, ge=0.0, le=1.0, description="weight of the heatmap's colour over the image "
                           "(0-1); 0.4 keeps the anatomy readable under it")
    sc_max_dimension: int = Field(2048, ge=256, description="pixels: the SC is shrunk so no side exceeds this")
    heatmap_for_negative: bool = Field(False, description="paint the heatmap of a negative decision too")
    uid_prefix: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)*\.$", max_length=40,
                                   description="root of the UIDs we create, ending in a dot; default "
                                   "pydicom's root: set your organisation's", examples=["1.2.826.0.1.3680043.10.999."])
    sc_compression: Literal["jpeg", "jpeg2000", "none"] = Field(
        "jpeg", description="SC transfer syntax: JPEG Baseline (lossy, 20x smaller), JPEG 2000 (lossy) or "
        "uncompressed")
    sc_quality: int = Field(90, ge=1, le=100, description="1-100: JPEG quality; JPEG 2000 aims at quality / 2 dB "
                            "PSNR. 90 keeps the burned-in text sharp")
    gsps: bool = Field(True, description=(
        "send a Grayscale Softcopy Presentation State that outlines the heatmap over the original image "
        "beside the SC (viewers with GSPS show it as a layer to switch off); on because it costs a few kB "
        "and shows the result on the radiologist's own image. Env: CXR_OUTPUT__GSPS"))
    gsps_series_number: int = Field(9003, ge=0, description="Series Number of the GSPS series; beside the SC's "
                                    "9001 and the SR's 9002. Env: CXR_OUTPUT__GSPS_SERIES_NUMBER")
    gsps_series_description: str = Field("AI Heatmap Outline", max_length=64, description=(
        "Series Description of the GSPS series, as a PACS lists it. Env: CXR_OUTPUT__GSPS_SERIES_DESCRIPTION"))


_DESTINATION_KINDS = ("dimse", "dicomweb", "hl7")


def _destination_kind(value: Any) -> str:
    if isinstance(value, DicomWebDestination) or (isinstance(value, dict) and "url" in value):
        return "dicomweb"
    if isinstance(value, Hl7Destination) or (isinstance(value, dict) and "mllp" in value):
        return "hl7"
    return "dimse"


#: A C-STORE, a DICOMweb or an HL7 destination; an error names the kind it was read as.
AnyDestination = Annotated[Annotated[Destination, Tag("dimse")] | Annotated[DicomWebDestination, Tag("dicomweb")]
                           | Annotated[Hl7Destination, Tag("hl7")], Discriminator(_destination_kind)]


class SendSection(_Section):
    """Where results go (C-STORE or DICOMweb STOW-RS) and how delivery is retried."""

    # Before destinations: their validator reads it.
    allow_http: bool = Field(False, description="allow http:// DICOMweb destinations on hosts other than "
                             "loopback (credentials and results then cross the network in clear text)")
    destinations: list[AnyDestination] = Field(
        [], description="where results go: AET@HOST:PORT (C-STORE), a DICOMweb base URL, or a table "
        "{url, auth, credentials_file | credentials_env}; in the environment a JSON list",
        examples=[["PACS@10.0.0.5:104",
                   {"url": "https://pacs.example.org/dicom-web", "auth": "bearer",
                    "credentials_file": "/run/secrets/pacs-token"},
                   {"url": "https://vna.example.org/dicomweb", "auth": "basic",
                    "credentials_env": "VNA_CREDENTIALS"}]])
    retry_initial_s: float = Field(10.0, gt=0, description="seconds before the first retry of a failed "
                                   "delivery; the interval then doubles")
    retry_max_interval_s: float = Field(1800.0, gt=0, description="longest interval between retries, in seconds")
    retry_horizon_h: float = Field(24.0, gt=0, description="hours after an object's first attempt before it "
                                   "goes to the dead letters; long enough to outlast a PACS's maintenance night")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for the PACS's C-STORE response")
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for the PACS to accept an association")
    network_timeout: float = Field(60.0, gt=0, description="seconds without network traffic before the "
                                   "association is closed")

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        # A URL becomes a table here so that pydantic reports its errors with their place.
        return [({"url": v} if _URL_RE.match(v) else {"mllp": v} if _MLLP_RE.match(v) else Destination.parse(v))
                if isinstance(v, str) else v for v in value]

    @field_validator("destinations")
    @classmethod
    def _check_http(cls, value: list[Destination | DicomWebDestination | Hl7Destination], info: ValidationInfo
                    ) -> list[Destination | DicomWebDestination | Hl7Destination]:
        names = [str(d) for d in value]
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"listed twice: {', '.join(twice)} (each destination has one outbox)")
        for dest in value:
            if isinstance(dest, DicomWebDestination) and dest.url.lower().startswith("http://") \
                    and not dest.loopback and not info.data.get("allow_http", False):
                raise ValueError(f"{dest.url}: http:// is allowed only for loopback (results and credentials "
                                 "would cross the network in clear text); use https:// or set send.allow_http = true")
        return value


class Hl7Section(_Section):
    """What the ORU^R01 to an HL7 destination says about its sender and receiver, and when it
    asks the RIS to move the study up the worklist."""

    triage_threshold: float | None = Field(None, ge=0.0, le=1.0, description=(
        "probability at or above which the ORU flags the study as urgent (TQ1-9 priority 'S', OBX-8 'A'); "
        "unset uses the model's own decision threshold, so 'urgent' means 'positive'. Set it higher to "
        "flag only the most likely findings, lower to flag more. Env: CXR_HL7__TRIAGE_THRESHOLD"))
    sending_application: str = Field("CXR-GRADCAM", min_length=1, max_length=20, description=(
        "MSH-3, how the RIS knows us. Env: CXR_HL7__SENDING_APPLICATION"))
    sending_facility: str = Field("", max_length=20, description="MSH-4. Env: CXR_HL7__SENDING_FACILITY")
    receiving_application: str = Field("", max_length=20, description="MSH-5, e.g. the RIS's name. "
                                       "Env: CXR_HL7__RECEIVING_APPLICATION")
    receiving_facility: str = Field("", max_length=20, description="MSH-6. Env: CXR_HL7__RECEIVING_FACILITY")


class SecuritySection(_Section):
    """Access control and DICOM TLS (BCP 195: TLS 1.2 or newer)."""

    allowed: list[str] = Field(default_factory=list, description="calling AE titles allowed, each AE or "
                               "AE@CIDR (tied to a network); empty allows every caller (logged at start)",
                               examples=[["PACS1@10.1.2.0/24", "MODALITY7@10.1.9.17/32"]])
    tls_port: int | None = Field(None, ge=1, le=65535, description="port of a second listener that speaks only "
                                 "DICOM TLS; none by default", examples=[2762])
    tls_only: bool = Field(False, description="no plain listener at all, only tls_port")
    tls_cert: Path | None = Field(None, description="PEM certificate of our TLS listener (and of outgoing TLS)",
                                  examples=["/etc/cxr-gradcam/tls/server.crt"])
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert",
                                 examples=["/etc/cxr-gradcam/tls/server.key"])
    tls_ca: Path | None = Field(None, description="PEM CA that verifies clients and the PACS (https:// "
                                "destinations too; without it the system store)",
                                examples=["/etc/cxr-gradcam/tls/ca.crt"])
    tls_require_client_cert: bool = Field(False, description="refuse TLS clients without a certificate signed "
                                          "by tls_ca")
    send_tls: bool = Field(False, description="outgoing C-STOREs over TLS, verifying the PACS against tls_ca")

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

    port: int = Field(9108, ge=0, le=65535, description="port of /metrics, /healthz and /readyz; "
                      "0 switches the HTTP endpoint off")
    bind: str = Field("127.0.0.1", description="address of the HTTP endpoint; loopback unless a Prometheus "
                      "on another host scrapes it")
    echo_cache_s: float = Field(30.0, ge=0, description="seconds between the background C-ECHOs of each destination "
                                "(cxr_destination_up, /healthz); never part of /readyz")


class DriftSection(_Section):
    """Drift and gate alarms: the worker's recent answers against the model's validation split."""

    window: int = Field(500, ge=10, le=100_000, description=(
        "images: the sliding window both statistics are computed over, the last N images the model ran on "
        "(CXR_DRIFT__WINDOW). 500 is about a day at a small site: long enough for a PSI of 10 bins to be "
        "stable (its noise is ~0.02 at 500), short enough that a new scanner shows within a day"))
    min_images: int = Field(100, ge=1, description=(
        "images: the PSI is reported once the window holds this many (CXR_DRIFT__MIN_IMAGES); below it a "
        "10-bin PSI's own noise (~0.1 at 100) would be mistaken for drift. The gated-rate test needs no "
        "minimum: its p-value is exact for any count"))
    psi_limit: float = Field(0.25, gt=0, description=(
        "the population stability index of the window's probabilities above which the probability "
        "distribution has drifted (CXR_DRIFT__PSI_LIMIT; exported as cxr_drift_psi_limit, which the shipped "
        "alert rules compare with). 0.25 is the conventional 'significant shift'"))
    gated_alpha: float = Field(0.001, gt=0, lt=0.5, description=(
        "the one-sided binomial test's p-value below which the window holds more gated images than the "
        "gate's conformal false-gate rate explains (CXR_DRIFT__GATED_ALPHA; exported as cxr_drift_gated_alpha). "
        "0.001, because the test is repeated after every image: in a simulation of in-distribution streams "
        "at the bound's rate the alarm was on for under 1% of images"))


class FeedbackSection(_Section):
    """``cxr-worker feedback export``: readers' labels for the trainer, de-identified."""

    pseudonym_key_file: Path | None = Field(
        None, description="the site's HMAC key for patient, image and reader pseudonyms (created 0600 when "
                          "missing); default <spool>/feedback-pseudonym.key. Keep it: a new key gives every "
                          "patient a new pseudonym",
        examples=["/var/lib/cxr-gradcam/feedback-pseudonym.key"])


class AuditSection(_Section):
    """Audit trail: JSON lines modelled on DICOM PS3.15 A.5 audit messages."""

    path: Path = Field(Path("var/audit.jsonl"), description="the audit trail (JSON lines, fsynced), shared "
                       "by the worker and the dashboard")


class DashboardSection(_Section):
    """The review and operations web application (``cxr-worker dashboard``) and the results database."""

    port: int = Field(8080, ge=1, le=65535, description="port of the dashboard's web server")
    bind: str = Field("127.0.0.1", description="address of the web server; loopback unless the operator opens "
                      "it (the pages show patient data)")
    public_url: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=200,
                                   description="the address readers open; set (and record on), the SC prints "
                                   "and the SR carries a review link <public_url>/r/<key>",
                                   examples=["https://cxr.example.org:8080"])
    tls_cert: Path | None = Field(None, description="PEM certificate for HTTPS (both tls_cert and tls_key, "
                                  "or neither)", examples=["/etc/cxr-gradcam/tls/server.crt"])
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert",
                                 examples=["/etc/cxr-gradcam/tls/server.key"])
    database_url: str | None = Field(None, description="SQLAlchemy URL of the results database; default "
                                     "SQLite <spool>/results/results.db; PostgreSQL for several workers",
                                     examples=["postgresql+psycopg://cxr@db/cxr"])
    media_dir: Path | None = Field(None, description="previews and Grad-CAM grids; default <spool>/results/media "
                                   "(a shared volume with PostgreSQL)", examples=["/var/lib/cxr-gradcam/media"])
    retention_days: float = Field(30.0, gt=0, description="days after which results, feedback and images are "
                                  "deleted together")
    record: bool = Field(True, description="the worker records each result for the dashboard")
    metrics_url: str | None = Field(None, description="the worker's /metrics, for queue and outbox depth; "
                                    "default http://<metrics.bind>:<metrics.port>/metrics",
                                    examples=["http://127.0.0.1:9108/metrics"])
    session_hours: float = Field(8.0, gt=0, description="hours a login lasts (a working shift)")
    secure_cookies: bool | None = Field(None, description="Secure flag of the session cookie; default: on with TLS",
                                          examples=[True])
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed (the login limit and the audit trail then see the reader's address); "
        "default none: any client could otherwise choose its own address. CXR_DASHBOARD__TRUSTED_PROXIES")
    allowed_hosts: list[str] | None = Field(
        None, description="Host header values accepted (others get HTTP 400), against DNS rebinding; default "
        "the loopback names, the bind address and public_url's host. CXR_DASHBOARD__ALLOWED_HOSTS")
    max_body_bytes: int = Field(
        65536, ge=1024, description="request bodies larger than this many bytes are refused (HTTP 413) before "
        "they are read; the largest form (feedback with a 2,000-character comment) is under 30 KB. "
        "CXR_DASHBOARD__MAX_BODY_BYTES")
    login_concurrency: int = Field(
        4, ge=1, le=64, description="password checks (Argon2, tens of ms of CPU and 64 MiB each) running at "
        "once; more logins wait for a free slot up to 10 s, then get HTTP 503. CXR_DASHBOARD__LOGIN_CONCURRENCY")
    header_timeout_s: float = Field(
        10.0, gt=0, description="seconds a connection may take to send its request headers before it is "
        "closed (slow-header clients would otherwise hold connections forever). CXR_DASHBOARD__HEADER_TIMEOUT_S")
    max_connections: int = Field(
        100, ge=1, description="concurrent connections served; beyond, HTTP 503 (a review site has tens of "
        "readers). CXR_DASHBOARD__MAX_CONNECTIONS")

    @model_validator(mode="after")
    def _check_tls(self) -> DashboardSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("dashboard TLS needs both tls_cert and tls_key")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return self

    def store_url(self, spool_dir: Path) -> str:
        """The database URL: the configured one, or SQLite beside the spool."""
        return self.database_url or f"sqlite:///{(Path(spool_dir) / 'results' / 'results.db').resolve()}"

    def store_media(self, spool_dir: Path) -> Path:
        return self.media_dir or Path(spool_dir) / "results" / "media"


class LogSection(_Section):
    """Logs on stderr; they never carry patient names, IDs or birth dates."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="lowest level logged")
    format: Literal["json", "text"] = Field("json", description="json: one JSON object a line, for a log "
                                            "collector; text: for a terminal")


class ProcessingSection(_Section):
    """How many processes answer images (decode, infer + Grad-CAM, build and encode the SC and SR)."""

    workers: Literal["auto"] | int = Field(
        1, description="processes that answer claimed batches side by side, each with its own ONNX Runtime "
        "session; \"auto\" = the machine's cores. 1 (the default) answers in the service's own process: "
        "each further process holds one more model (~0.3 GiB for the int8 224-px model, docs/operations.md). "
        "CXR_PROCESSING__WORKERS")

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: Literal["auto"] | int) -> Literal["auto"] | int:
        if value != "auto" and (isinstance(value, bool) or value < 1):
            raise ValueError(f"workers must be \"auto\" or at least 1. Received: workers={value!r}")
        return value

    def count(self) -> int:
        """The number of processes: ``workers``, or the cores this process may run on."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        return self.workers


class Settings(BaseSettings):
    """Everything the worker reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="CXR_", env_nested_delimiter="__", extra="forbid")

    dicom: DicomSection = DicomSection()
    spool: SpoolSection = SpoolSection()
    model: ModelSection = ModelSection()
    processing: ProcessingSection = ProcessingSection()
    select: SelectSection = SelectSection()
    output: OutputSection = OutputSection()
    send: SendSection = SendSection()
    hl7: Hl7Section = Hl7Section()
    security: SecuritySection = SecuritySection()
    metrics: MetricsSection = MetricsSection()
    audit: AuditSection = AuditSection()
    dashboard: DashboardSection = DashboardSection()
    log: LogSection = LogSection()
    feedback: FeedbackSection = FeedbackSection()
    drift: DriftSection = DriftSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: an operator's environment beats the flags (the init arguments),
        # and both beat the TOML file; pydantic-settings merges the sections key by key.
        return (env_settings, init_settings, TomlConfigSettingsSource(settings_cls, toml_file=_toml_file.get()))


#: The TOML file of the Settings being built; a context variable because
#: settings_customise_sources is a class method and takes no per-call argument.
_toml_file: ContextVar[Path | None] = ContextVar("cxr_worker_toml_file", default=None)


def default_config() -> Path:
    """The shipped ``worker.toml`` (every key with its default), from the installed package.

    A path, so that it can be handed to ``cxr-worker serve --config``: pip installs
    packages as plain folders.
    """
    return Path(str(resources.files("worker") / "defaults" / "worker.toml"))


def _env_parse_error(exc: SettingsError) -> str:
    """Name the variables behind pydantic-settings' "error parsing value for field <section>"."""
    m = re.search(r'field "(\w+)"', str(exc))
    prefix = f"CXR_{m[1] if m else ''}__".upper()
    culprits = ", ".join(f"{k}={v!r}" for k, v in sorted(os.environ.items()) if k.upper().startswith(prefix))
    return f"environment: {culprits or exc}: not valid JSON (lists are JSON, e.g. '[\"PACS@10.0.0.5:104\"]')"


def get_settings(path: Path | None = None, flags: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Build the settings from the environment, the flags and the TOML file.

    Args:
        path: The TOML file; without one, the defaults above (which ``default_config()`` states).
        flags: Command-line values by section; None means "flag not given".

    Raises:
        ConfigError: one line naming the key, the bad value and its environment variable.
    """
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    given: dict[str, Any] = {section: {k: v for k, v in values.items() if v is not None}
                             for section, values in (flags or {}).items()}
    token = _toml_file.set(Path(path) if path is not None else None)
    try:
        return Settings(**given)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except SettingsError as exc:  # an environment value that is not JSON where a list is expected
        raise ConfigError(_env_parse_error(exc)) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        # The tag of a destination's kind ("dicomweb", "dimse") is pydantic's, not a key.
        where = ".".join(str(p) for p in err["loc"] if p not in _DESTINATION_KINDS)
        env = "CXR_" + "__".join(str(p) for p in err["loc"][:2]).upper()
        section, key = ([str(p) for p in err["loc"]] + ["", ""])[:2]
        source = (f"environment {env}" if env in {k.upper() for k in os.environ}
                  else "flags" if key in given.get(section, {}) else path or "settings")
        # redact(): a URL with USER:PASSWORD in it is refused, and must not be echoed.
        raise ConfigError(redact(
            f"{source}: {where}: {err['msg']} (received {_shown_input(err.get('input'))}; environment {env})"
        )) from None
    finally:
        _toml_file.reset(token)
