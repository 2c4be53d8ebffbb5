"""How frames leave: over a WebSocket (aiohttp, with the direct write of whole text frames) or as
Server-Sent Events. Frames are encoded by shared.protocol; these only carry them."""

from __future__ import annotations

import fcntl
import struct
import termios

import anyio
from aiohttp import WSMsgType, web

from shared.protocol import (
    CLOSE_CODE,
    SSE_KEEPALIVE,
    CloseReason,
    Frame,
    encode_frame,
    sse_close_frame,
    sse_message,
)

WS_CLOSE_TIMEOUT = 5.0  # no byte taken for this long: the peer is not reading
WS_CLOSE_MAX = 60.0  # a close frame waits at most this long behind what a slow reader still has to read


def text_frame(payload: bytes) -> bytes:
    """A whole unmasked, uncompressed WebSocket text frame (RFC 6455 5.2), as a server sends it: what
    aiohttp's writer puts on the wire for send_frame(payload, TEXT), for the direct writes."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class WsTransport:
    def __init__(self, ws: web.WebSocketResponse, kind: str, request: web.Request) -> None:
        self.ws = ws
        self.kind = kind
        self.tcp = request.transport  # the upgraded connection (uncompressed: see streams._websocket())
        # the task reading the peer's messages (streams._read_client): stopped before a close, since
        # aiohttp drops the connection right after the close frame when a receive is pending, cutting
        # off what the peer has yet to read (the close frame included: it would see 1006)
        self.reader: anyio.CancelScope | None = None
        self.reader_done = anyio.Event()

    def write_now(self, frame: bytes) -> bool:
        tcp = self.tcp
        if tcp is None or tcp.is_closing() or self.ws.closed or tcp.get_write_buffer_size():
            return False
        tcp.write(text_frame(frame))
        return True

    async def send_events(self, frame: bytes, cursor: str) -> None:
        await self.ws.send_frame(frame, WSMsgType.TEXT)

    async def send_frame(self, frame: Frame, cursor: str | None = None) -> None:
        await self.ws.send_frame(encode_frame(frame), WSMsgType.TEXT)

    async def send_notice(self, frame: bytes) -> None:
        await self.ws.send_frame(frame, WSMsgType.TEXT)

    async def close(self, reason: CloseReason) -> None:
        """Send the close frame behind what is already buffered for the peer. A peer that reads slowly
        gets it (4008 included) as long as it keeps taking bytes, up to WS_CLOSE_MAX; one that reads
        nothing for WS_CLOSE_TIMEOUT cannot take it and is dropped (it sees 1006)."""
        if self.reader is not None:
            self.reader.cancel()
            await self.reader_done.wait()
        with anyio.move_on_after(WS_CLOSE_MAX):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drop_when_stalled, tg.cancel_scope)
                await self.ws.close(code=CLOSE_CODE[reason], message=reason.encode())
                tg.cancel_scope.cancel()

    async def _drop_when_stalled(self, scope: anyio.CancelScope) -> None:
        left, since = self._unsent(), anyio.current_time()
        while anyio.current_time() - since < WS_CLOSE_TIMEOUT:
            await anyio.sleep(0.25)
            now_left = self._unsent()
            # the peer took bytes, or has all of them (the close frame too) in its own buffer: it is
            # reading or about to; wait on, up to WS_CLOSE_MAX, for its close reply
            if now_left < left or now_left == 0:
                since = anyio.current_time()
            left = now_left
        scope.cancel()

    def _unsent(self) -> int:
        """Bytes not yet taken by the peer: asyncio's buffer plus the kernel's send queue."""
        tcp = self.tcp
        if tcp is None or tcp.is_closing():
            return 0
        queued = tcp.get_write_buffer_size()
        sock = tcp.get_extra_info("socket")
        if sock is not None:
            try:
                queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass  # no send-queue size here (not Linux, socket gone): asyncio's buffer alone says it
        return queued

    async def keepalive(self) -> None:
        return  # aiohttp's heartbeat pings the peer


class SseTransport:
    kind = "sse"

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp

    async def send_events(self, frame: bytes, cursor: str) -> None:
        await self.resp.write(sse_message(frame, id=cursor))

    async def send_frame(self, frame: Frame, cursor: str | None = None) -> None:
        await self.resp.write(sse_message(encode_frame(frame), id=cursor or None))

    async def send_notice(self, frame: bytes) -> None:
        await self.resp.write(sse_message(frame, event="error"))

    async def close(self, reason: CloseReason) -> None:
        last = sse_close_frame(CLOSE_CODE[reason], reason)
        if last is not None:
            try:
                await self.resp.write(sse_message(encode_frame(last), event="error"))
            except ConnectionError:
                return
        try:
            await self.resp.write_eof()
        except ConnectionError:
            return

    async def keepalive(self) -> None:
        await self.resp.write(SSE_KEEPALIVE)

    def write_now(self, frame: bytes) -> bool:
        return False  # the response is chunk-encoded by aiohttp: its writer frames every write
