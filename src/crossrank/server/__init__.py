"""The rerank HTTP server (``crossrank serve``; needs the ``server`` extra).

``create_app`` and ``ServerSettings`` are imported lazily so that importing the command
(``crossrank.cli.serve``) does not require FastAPI until the server actually starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crossrank.server.app import create_app
    from crossrank.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from crossrank.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from crossrank.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'crossrank.server' has no attribute {name!r}")
