"""The WebSocket connection of a Pipecat service to a pipecat-nvidia server.

Mixed into a Pipecat ``WebsocketSTTService`` / ``WebsocketTTSService`` (before it in the
bases), it opens the connection with the optional bearer token, waits for the server's
``ready``, parses every server message with the protocol's parser, reports server errors
as Pipecat errors, and leaves reconnecting with backoff to Pipecat's WebSocket service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loguru import logger
from pipecat.utils.errors import ErrorCategory
from pydantic import BaseModel
from websockets.protocol import State

from pipecat_nvidia.protocol import PROTOCOL_VERSION, ErrorCode, ErrorMessage, ProtocolError

ERROR_CATEGORIES: dict[ErrorCode, ErrorCategory] = {
    **dict.fromkeys(
        (
            ErrorCode.BAD_JSON,
            ErrorCode.UNKNOWN_TYPE,
            ErrorCode.INVALID_MESSAGE,
            ErrorCode.UNKNOWN_VOICE,
            ErrorCode.UNKNOWN_LANGUAGE,
            ErrorCode.UNKNOWN_PRESET,
        ),
        ErrorCategory.INVALID_REQUEST,
    ),
    **dict.fromkeys(
        (
            ErrorCode.EMPTY_TEXT,
            ErrorCode.TEXT_TOO_LONG,
            ErrorCode.TEXT_OVERFLOW,
            ErrorCode.MESSAGE_TOO_BIG,
            ErrorCode.BAD_AUDIO,
        ),
        ErrorCategory.APPLICATION,
    ),
    ErrorCode.NOT_READY: ErrorCategory.CONNECTIVITY,
}
"""Pipecat's category for each server error code; the rest (``internal``, ``server_full``,
``audio_overflow``) are the server's. Requests the server cannot take as they are (a
voice it lacks, a malformed message) are permanent for Pipecat: every later one fails
the same way until the settings change. What one message held (a sentence with nothing
to speak or too much, audio too large or not whole samples) says nothing about the
service, and the server goes on; nor does text sent far ahead of the speech."""


class ServerUnreachable(ConnectionError):
    """A failed connect, naming the server. It keeps the HTTP response of a refused
    handshake, from which Pipecat reads the error's category: a wrong token is then an
    authentication error, which no retry can fix, not a connectivity one."""

    def __init__(self, url: str, cause: Exception):
        super().__init__(f"cannot connect to {url}: {cause}")
        self.response = getattr(cause, "response", None)


class ServerConnection:
    """Connection handling shared by the pipecat-nvidia services."""

    reconnect_attempts: int = 12
    """Reconnect attempts before the service gives up on its server: about 90 s with
    Pipecat's default backoff (its own three, about 12 s, end before a restarted server,
    which takes about as long to import, is listening again)."""

    def _init_connection(self, url: str, auth_token: str | None, parse: Callable[[str | bytes], BaseModel]) -> None:
        self._url = url
        self._auth_token = auth_token
        self._parse = parse
        self._receive_task = None
        self._ready: Any = None

    @property
    def ready(self) -> Any:
        """The server's ``ready`` for the current connection, or None before it."""
        return self._ready

    def _is_open(self) -> bool:
        return self._ready is not None and self._websocket is not None and self._websocket.state is State.OPEN

    # ------------------------------------------------------------------ what a service adds

    async def _on_server_message(self, message: BaseModel) -> None:
        """A message other than ``ready`` and ``error``."""

    async def _on_server_ready(self) -> None:
        """Called once ``self.ready`` holds the new connection's ``ready``."""

    async def _on_connection_lost(self) -> None:
        """Called before the connection closes: end what waited for this server."""

    # ------------------------------------------------------------------ messages

    async def _receive_messages(self):
        if self._websocket is None:
            raise ConnectionError(f"not connected to {self._url}")
        async for raw in self._websocket:
            try:
                message = self._parse(raw)
            except ProtocolError as e:
                logger.warning(f"{self}: ignoring a message the protocol does not know ({e})")
                continue
            if message.type == "ready" and message.protocol_version != PROTOCOL_VERSION:
                # Its messages would be misread: no retry or reconnect can fix that.
                await self.push_error(
                    f"{self}: the server at {self._url} speaks protocol version {message.protocol_version}; "
                    f"this service speaks {PROTOCOL_VERSION}. Install matching versions of pipecat-nvidia.",
                    force_treat_as_permanent=True,
                )
            elif message.type == "ready":
                self._ready = message
                self._settings.model = message.model
                self._sync_model_name_to_metrics()
                logger.debug(f"{self}: ready ({message.model})")
                await self._on_server_ready()
                await self._call_event_handler("on_connected")
            elif isinstance(message, ErrorMessage):
                await self.push_error(
                    f"{self}: server error {message.code.value}: {message.message}",
                    category=ERROR_CATEGORIES.get(message.code, ErrorCategory.SERVER),
                )
            else:
                await self._on_server_message(message)

    # ------------------------------------------------------------------ connection

    async def _try_reconnect(self, max_retries: int | None = None, report_error=None) -> bool:
        """Pipecat's reconnect loop, with this service's number of attempts."""
        attempts = self.reconnect_attempts if max_retries is None else max_retries
        return await super()._try_reconnect(max_retries=attempts, report_error=report_error)

    async def _connect(self):
        try:
            await self._connect_websocket()
        except Exception as e:
            await self.push_error(f"{self}: cannot connect to the server at {self._url}: {e}", exception=e)
            await self._call_event_handler("on_connection_error", str(e))
        await super()._connect()
        # Started even when the connection failed: the receive loop then goes straight
        # to its reconnect path, which retries with backoff and gives up with an error.
        if not self._receive_task:
            self._receive_task = self.create_task(self._receive_until_given_up())

    async def set_usable(self, is_usable: bool):
        """A service that gave up on its server has no receive loop left: brought back (a
        settings change, or the application once the server is up again), it connects anew."""
        await super().set_usable(is_usable)
        if is_usable and self._receive_task is not None and self._receive_task.done():
            self._receive_task = None
            await self._connect()

    async def _receive_until_given_up(self):
        """Pipecat's receive loop, which returns once it gives up on the server (reconnects
        off, or too many failures): what waited for the server ends then, as on a reconnect."""
        await self._receive_task_handler(self._report_error)
        await self._disconnect_websocket()

    async def _disconnect(self):
        await super()._disconnect()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self):
        """Open the connection; raises if the server cannot be reached, so that each
        reconnect attempt reports the real cause once."""
        if self._websocket and self._websocket.state is State.OPEN:
            return
        headers = {"Authorization": f"Bearer {self._auth_token}"} if self._auth_token else None
        try:
            self._websocket = await self._websocket_connect(self._url, additional_headers=headers)
        except Exception as e:
            self._websocket = None
            raise ServerUnreachable(self._url, e) from e
        logger.debug(f"{self}: connected to {self._url}, waiting for ready")

    async def _disconnect_websocket(self):
        self._ready = None
        await self._on_connection_lost()
        try:
            if self._websocket and self._websocket.state is State.OPEN:
                await self._websocket.close()
        except Exception as e:
            logger.warning(f"{self}: error closing the connection: {e}")
        finally:
            had_websocket = self._websocket is not None
            self._websocket = None
            if had_websocket:
                await self._call_event_handler("on_disconnected")
