"""The unauthenticated mode: a bare header in, a bare header out. Always on; the shell adds it."""

from __future__ import annotations

from typing import ClassVar

from .handler import ReplyContext, Request, RequestHandler


class PlainHandler(RequestHandler):
    """Answers requests that carry no authentication (unknown extension fields are ignored)."""

    name: ClassVar[str] = "none"
    order: ClassVar[int] = 1000
    bare: ClassVar[bool] = True

    def matches(self, request: Request) -> int:
        return 0 if request.trailer else 1

    def respond(self, request: Request, ctx: ReplyContext) -> bytes:
        return ctx.reply_header(request.data, request.rx_ns)
