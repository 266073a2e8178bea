"""Operator routes: readiness, liveness, Prometheus metrics, version."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.errors import APIError
from server.protocol.common import ErrorResponse
from server.protocol.misc import HealthResponse, VersionResponse
from server.state import get_state

router = APIRouter()


def ember_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ember")
    except PackageNotFoundError:
        return "0.0.0+unknown"


@router.get("/health", response_model=HealthResponse,
            responses={503: {"model": ErrorResponse, "description": "loading, draining or engine stopped"}})
async def health(request: Request) -> HealthResponse:
    """Ready to serve: 200 once the engine is warm, 503 while loading or draining."""
    state = get_state(request)
    if state.admission.draining:
        raise APIError(503, "the server is shutting down", type="service_unavailable", code="draining")
    state.require_engine()
    return HealthResponse()


@router.get("/live", response_model=HealthResponse)
async def live() -> HealthResponse:
    """The process answers (no engine check)."""
    return HealthResponse()


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics; engine gauges are read at scrape time."""
    from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """Ember's version."""
    return VersionResponse(version=ember_version())
