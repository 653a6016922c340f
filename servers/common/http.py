"""Plain HTTP on a WebSocket server's port: health, Prometheus metrics, bearer auth."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

WEBSOCKET_PATH = "/"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


def http_response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)


def json_response(status: HTTPStatus, payload: dict) -> Response:
    return http_response(status, json.dumps(payload).encode() + b"\n", "application/json")


def bearer_token_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token``: the scheme's name in any case,
    as HTTP has it; the token compared in constant time."""
    scheme, _, credentials = (authorization or "").partition(" ")
    # Header bytes that are not UTF-8 come as lone surrogates: kept as they were sent.
    presented = credentials.strip().encode(errors="surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, token.encode())


def make_process_request(
    *,
    health: Callable[[], tuple[bool, dict]],
    registry: CollectorRegistry,
    auth_token: str | None,
):
    """A ``process_request`` hook for ``websockets.asyncio.server.serve``.

    ``GET /health`` answers 200 once ``health()`` says ready and 503 before (with its
    details either way); ``GET /metrics`` is the Prometheus text format; the WebSocket
    lives at ``/`` and, with ``auth_token``, needs ``Authorization: Bearer <token>``.
    """

    def process_request(connection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            ready, details = health()
            return json_response(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, details)
        if path == METRICS_PATH:
            return http_response(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)
        if path != WEBSOCKET_PATH:
            return json_response(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}"})
        authorization = request.headers.get_all("Authorization")
        if auth_token and not (len(authorization) == 1 and bearer_token_matches(authorization[0], auth_token)):
            return json_response(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
        return None

    return process_request
