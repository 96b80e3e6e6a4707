"""The site's HTTPS client for the coordinator: mutual TLS, outbound only.

It is the network's :class:`~fedcare.site.participant.CoordinatorLink`; the
simulation's is a direct call into the study service."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from fedcare.config import TlsFiles, check_tls_files, tls_files_error
from fedcare.federation.messages import TaskReply, TaskState
from fedcare.site.link import PAYLOAD, CoordinatorError, RetryableError

__all__ = [
    "PAYLOAD",
    "CoordinatorClient",
    "CoordinatorError",
    "RetryableError",
    "TaskState",
    "tls_context",
]


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """Trust only the consortium CA; present this site's certificate."""
    check_tls_files(tls)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as exc:
        raise tls_files_error(tls, exc) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return str(detail)[:2000]


class CoordinatorClient:
    """Thin, typed calls to the coordinator API."""

    def __init__(self, base_url: str, tls: TlsFiles, poll_wait_s: float = 20.0) -> None:
        self.poll_wait_s = poll_wait_s
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            verify=tls_context(tls),
            timeout=httpx.Timeout(30.0, read=poll_wait_s + 30.0),
        )

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        # 408: our body arrived too slowly (a slow link), so sending it again may work.
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise RetryableError(
                f"coordinator answered {response.status_code}: {_detail(response)}"
            )
        return response

    def whoami(self) -> str:
        response = self._call("GET", "/v1/whoami")
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        return str(response.json()["site"])

    def status(self, study_hash: str) -> dict[str, Any]:
        response = self._call("GET", f"/v1/studies/{study_hash}")
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        body: dict[str, Any] = response.json()
        return body

    def task(self, study_hash: str) -> TaskReply:
        response = self._call(
            "GET", f"/v1/studies/{study_hash}/task", params={"wait": self.poll_wait_s}
        )
        if response.status_code == 200:
            joins = response.headers.get("X-Fedcare-Kind") == "flush"
            sites = response.headers.get("X-Fedcare-Sites", "")
            return TaskReply(
                TaskState.JOIN if joins else TaskState.READY,
                response.content,
                int(response.headers["X-Fedcare-Round"]),
                tuple(sites.split(",")) if sites else (),
            )
        if response.status_code == 204:
            return TaskReply(TaskState.WAIT)
        if response.status_code == 410:
            return TaskReply(TaskState.FINISHED)
        raise CoordinatorError(response.status_code, _detail(response))

    def submit(self, study_hash: str, round_number: int, payload: bytes) -> bool:
        """Upload an update; True if newly accepted, False if it was a duplicate."""
        response = self._call(
            "POST",
            f"/v1/studies/{study_hash}/rounds/{round_number}/update",
            content=payload,
            headers={"Content-Type": PAYLOAD},
        )
        if response.status_code not in (200, 201):
            raise CoordinatorError(response.status_code, _detail(response))
        return bool(response.json()["accepted"])

    def validation_task(self, study_hash: str) -> tuple[int, bytes] | None:
        """(release id, validation task) this site still owes, or None."""
        response = self._call("GET", f"/v1/studies/{study_hash}/validation")
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        return int(response.headers["X-Fedcare-Release"]), response.content

    def send_verdict(self, study_hash: str, release: int, payload: bytes) -> dict[str, Any]:
        """Post a validation reply; the coordinator's record of it (passed, reasons)."""
        response = self._call(
            "POST",
            f"/v1/studies/{study_hash}/releases/{release}/verdict",
            content=payload,
            headers={"Content-Type": "application/json"},
        )
        if response.status_code not in (200, 201):
            raise CoordinatorError(response.status_code, _detail(response))
        body: dict[str, Any] = response.json()
        return body

    def secure_post(
        self, study_hash: str, round_number: int, stage: str, body: bytes, content_type: str
    ) -> bytes | None:
        """Send one secure-aggregation message for a round; the next stage's relay if it
        opened while the coordinator held the reply (up to the poll wait), else None."""
        response = self._call(
            "POST",
            f"/v1/studies/{study_hash}/rounds/{round_number}/secagg/{stage}",
            content=body,
            headers={"Content-Type": content_type},
            params={"wait": self.poll_wait_s},
        )
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        return response.content

    def secure_fetch(self, study_hash: str, round_number: int, stage: str) -> bytes | None:
        """The coordinator's relay for a secure stage, or None if it is not ready yet."""
        response = self._call(
            "GET",
            f"/v1/studies/{study_hash}/rounds/{round_number}/secagg/{stage}",
            params={"wait": self.poll_wait_s},
        )
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        return response.content

    def _notice(self, path: str, message: bytes) -> bool:
        response = self._call(
            "POST", path, content=message, headers={"Content-Type": "application/json"}
        )
        if response.status_code not in (200, 201):
            raise CoordinatorError(response.status_code, _detail(response))
        return bool(response.json()["recorded"])

    def withdraw(self, study_hash: str, message: bytes) -> bool:
        """Tell the coordinator this site stops taking part; True if newly recorded."""
        return self._notice(f"/v1/studies/{study_hash}/withdraw", message)

    def ready(self, study_hash: str, message: bytes) -> bool:
        """Say this site holds an update for a flush (asynchronous secure aggregation)."""
        return self._notice(f"/v1/studies/{study_hash}/ready", message)

    def send_drift(self, study_hash: str, body: bytes) -> bool:
        """Send a drift summary; True when newly kept."""
        return self._notice(f"/v1/studies/{study_hash}/drift", body)

    def send_alignment(self, study_hash: str, body: bytes) -> bool:
        """Send a round's alignment; True when newly kept."""
        return self._notice(f"/v1/studies/{study_hash}/alignment", body)

    def release_states(self, study_hash: str) -> dict[int, str]:
        """Each release's id and state (candidate, promoted, rejected)."""
        response = self._call("GET", f"/v1/studies/{study_hash}/releases")
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        return {int(r["id"]): str(r["state"]) for r in response.json()}

    def crl(self) -> bytes | None:
        """The consortium CA's revocation list the coordinator serves (None if it has none)."""
        response = self._call("GET", "/v1/crl")
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        return response.content

    def model(self, study_hash: str) -> bytes:
        response = self._call("GET", f"/v1/studies/{study_hash}/model")
        if response.status_code != 200:
            raise CoordinatorError(response.status_code, _detail(response))
        return response.content
