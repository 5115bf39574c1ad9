"""The server API: transport-agnostic service and its HTTP routes."""

from __future__ import annotations

from tidings.api.http import (
    add_api_routes,
    add_not_found_route,
    json_errors,
    method_not_allowed,
)
from tidings.api.service import ApiService

__all__ = [
    "ApiService",
    "add_api_routes",
    "add_not_found_route",
    "json_errors",
    "method_not_allowed",
]
