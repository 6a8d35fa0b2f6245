"""Send over DICOMweb: STOW-RS (PS3.18 10.5) to a destination's base URL, with dicomweb-client.

One object per request: a STOW-RS response may mix stored and failed instances, and servers
disagree on the HTTP status of a mixed answer (Orthanc 1.10 answers 400 when one of two
failed), so one part per request makes every HTTP status an object's own. The session keeps
the connection alive, so the extra requests cost little.

Which failures are worth a resend (the outbox's rules, as for C-STORE):

* the response's Failed SOP Sequence names the object: its Failure Reason decides, read as
  the C-STORE status it is (PS3.18 Table 10.5.3-1; :func:`worker.status.is_permanent`);
* otherwise a 4xx is permanent (the request itself is wrong) except 408 and 429 (the server
  is busy) and 401 and 403: credentials expire and are rotated, and a result must not be
  dead-lettered because a token ran out; they are retried like a server that is down, the
  credentials are read again for each round, and the retry horizon still ends the wait;
* 5xx, a refused or lost connection, a timeout and a TLS failure are transient.

A failure of the destination rather than of the object (all of the transient ones) ends the
round: the object in flight is charged, and the rest are charged too when nothing was stored
in this round (the destination is down) or left for the next round otherwise, as a lost
association does for C-STORE.
"""

from __future__ import annotations

import logging
import os
import ssl
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread

from worker.config import DicomWebDestination, SecuritySection, SendSection
from worker.errors import SendError
from worker.status import is_permanent

logger = logging.getLogger(__name__)

#: 4xx answers that say "not now" or "not with these credentials" rather than "never".
RETRIED_CLIENT_ERRORS = frozenset({HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN, HTTPStatus.REQUEST_TIMEOUT,
                                   HTTPStatus.TOO_MANY_REQUESTS})

#: dicomweb-client streams a body larger than its chunk size with chunked transfer encoding
#: (and then omits the Host header's workaround); results are in memory anyway, and a
#: Content-Length passes every proxy.
_NO_CHUNKING = 1 << 31


def http_permanent(status: int) -> bool:
    """Whether an HTTP status without a Failed SOP Sequence refuses the object for good."""
    return 400 <= status < 500 and status not in RETRIED_CLIENT_ERRORS


def verify_for(security: SecuritySection) -> str | bool:
    """What requests verifies the server's certificate against: ``security.tls_ca``, else
    the system's CA store (requests would use certifi's bundle instead)."""
    if security.tls_ca is not None:
        return str(security.tls_ca)
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        return paths.cafile
    if paths.capath and os.path.isdir(paths.capath):
        return paths.capath
    return True


class _Session(requests.Session):
    """A session whose ``verify`` is the one it was given: requests lets REQUESTS_CA_BUNDLE in
    the environment override a session's CA bundle, which would silently drop ``tls_ca``.

    It never follows a redirect: the destination is the configured URL, checked at start-up
    (https, or http on loopback only); a 3xx is a failed delivery, not a new destination.
    """

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["allow_redirects"] = False
        return super().request(*args, **kwargs)

    def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        merged: dict[str, Any] = super().merge_environment_settings(*args, **kwargs)
        merged["verify"] = self.verify
        return merged


class StowClient:
    """One DICOMweb destination: its HTTP session, STOW-RS of result files and a cheap check.

    Not thread-safe (a requests session is not): the sending thread and the destination
    monitor each hold their own.
    """

    def __init__(self, dest: DicomWebDestination, settings: SendSection, security: SecuritySection) -> None:
        self.dest = dest
        self.session = _Session()
        self.session.verify = verify_for(security)
        if security.send_tls and security.tls_cert and security.tls_key:
            self.session.cert = (str(security.tls_cert), str(security.tls_key))
        self.client = DICOMwebClient(dest.url, session=self.session, chunk_size=_NO_CHUNKING,
                                     timeout=(settings.acse_timeout, settings.dimse_timeout))
        self.client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff

    def _authorise(self) -> None:
        """Set the credentials, read afresh so that a rotated file or token takes effect.

        Raises:
            SendError: they cannot be read now (transient: they may be restored).
        """
        if self.dest.auth == "none":
            return
        try:
            secret = self.dest.secret()
        except ValueError as exc:
            raise SendError(f"credentials: {exc}") from None
        if self.dest.auth == "basic":
            user, _, password = secret.partition(":")
            self.session.auth = (user, password)
        else:
            self.session.headers["Authorization"] = f"Bearer {secret}"

    def store(self, paths: list[Path]) -> list[SendError | None]:
        """STOW-RS each file in ``paths``, one request each.

        Returns:
            One entry per path: None when stored, else the SendError (``attempted`` False for
            the objects left for the next round).
        """
        try:
            self._authorise()
        except SendError as exc:
            return [SendError(f"{self.dest}: {exc}")] * len(paths)
        results: list[SendError | None] = []
        for i, path in enumerate(paths):
            try:
                ds = dcmread(path)
            except Exception as exc:
                results.append(SendError(f"{self.dest}: unreadable result file ({type(exc).__name__})",
                                         permanent=True))
                continue
            err, destination_failed = self._store_one(ds)
            results.append(err)
            if destination_failed:
                rest = paths[i + 1:]
                stored_any = any(r is None for r in results)
                results += [SendError(str(err), attempted=not stored_any) for _ in rest]
                break
        return results

    def _store_one(self, ds: Dataset) -> tuple[SendError | None, bool]:
        """(the object's outcome, whether the destination rather than the object failed)."""
        uid = str(ds.SOPInstanceUID)
        answered: list[int] = []  # the HTTP status, once a response has arrived
        hook = lambda response, *args, **kwargs: answered.append(response.status_code)  # noqa: E731
        self.session.hooks["response"].append(hook)
        try:
            answer = self.client.store_instances([ds])
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            err = _judge(str(self.dest), uid, status, _failure_reasons(exc.response))
            return err, err is not None and not err.permanent
        except Exception as exc:
            if answered and 200 <= answered[-1] < 300:
                # The server said stored; only its answer's body (DICOM JSON/XML) is unreadable
                # (requests' own JSONDecodeError included).
                logger.warning("STOW-RS answer not readable (%s); counted as stored", type(exc).__name__,
                               extra={"destination": str(self.dest), "sop_instance_uid": uid})
                return None, False
            if isinstance(exc, requests.RequestException):
                # Refused or lost connection, timeout, TLS (requests' messages name the URL, never
                # credentials), or a request requests would not send (a bad URL or header): the
                # destination, not the object; retried until the horizon and shown as down.
                return SendError(f"{self.dest}: {type(exc).__name__}: {_cause(exc)}"), True
            if answered:  # a response that was not 2xx yet raised no HTTPError: the server's
                return SendError(f"{self.dest}: HTTP {answered[-1]} ({type(exc).__name__})"), True
            # Nothing was sent: the object could not be encoded (permanent), or the request
            # could not be made (e.g. credentials that HTTP cannot carry; the destination's).
            if isinstance(exc, UnicodeError):
                return SendError(f"{self.dest}: request not sent: {type(exc).__name__}"), True
            return SendError(f"{self.dest}: cannot encode the object ({type(exc).__name__})", permanent=True), False
        finally:
            self.session.hooks["response"].remove(hook)
        status = answered[-1] if answered else HTTPStatus.OK
        if 300 <= status < 400:  # not followed (see _Session): the object was not stored
            return SendError(f"{self.dest}: HTTP {status} redirect not followed"), True
        return _judge(str(self.dest), uid, status, _reasons_in(answer)), False

    def check(self) -> None:
        """QIDO-RS ``/studies?limit=1`` (one small query): the server answers and takes our credentials.

        Raises:
            SendError: it did not.
        """
        self._authorise()
        try:
            self.client.search_for_studies(limit=1, fields=["StudyInstanceUID"])
        except requests.HTTPError as exc:
            raise SendError(f"HTTP {exc.response.status_code if exc.response is not None else '?'}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SendError(f"{type(exc).__name__}: {_cause(exc)}") from None

    def close(self) -> None:
        self.session.close()


def _cause(exc: Exception) -> str:
    """The innermost reason of a requests error, on one line (urllib3 nests three deep)."""
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    return " ".join(str(inner).split())[:300]


def _failure_reasons(response: requests.Response | None) -> dict[str, int | None]:
    """The Failed SOP Sequence of an error response, by SOP Instance UID (empty when the body is not one)."""
    if response is None or not response.content.lstrip().startswith(b"{"):
        return {}
    try:
        return _reasons_in(pydicom.Dataset.from_json(response.content))
    except Exception:  # a proxy's JSON error page, or a broken body: the HTTP status decides
        return {}


def _reasons_in(answer: Dataset) -> dict[str, int | None]:
    reasons: dict[str, int | None] = {}
    for item in answer.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        reasons[str(item.get("ReferencedSOPInstanceUID", ""))] = int(reason) if reason is not None else None
    return reasons


def _judge(dest: str, uid: str, status: int, failed: dict[str, int | None]) -> SendError | None:
    """The object's outcome from the HTTP status and the response's Failed SOP Sequence."""
    if uid in failed:
        reason = failed[uid]
        if reason is not None:
            return SendError(f"{dest}: refused, HTTP {status}, failure reason 0x{reason:04X}",
                             permanent=is_permanent(reason))
        return SendError(f"{dest}: refused, HTTP {status}", permanent=http_permanent(status) or status < 400)
    if 200 <= status < 300:
        return None
    return SendError(f"{dest}: HTTP {status}", permanent=http_permanent(status))
