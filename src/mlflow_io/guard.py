"""The guard in front of MLflow's scoring app (`python -m src.serve`): requests are checked before
MLflow reads them, and every error answer is one line.

MLflow's scoring server (`mlflow.pyfunc.scoring_server`) reads any body whole, however large; answers
a lone surrogate, a CSV body or a non-JSON body with its Python stack trace (install paths, versions);
fails with HTTP 500 on JSON nested deeply enough to exhaust Python's recursion; and copies the request
into its error message (a 2 MB bad body comes back as a 2 MB answer). This ASGI middleware, for
POST /invocations:

- refuses a body over the limit with 413, from its Content-Length before reading it or while reading
  a chunked one;
- takes `application/json` and `text/csv` (with a `text` column, passed on as JSON) in UTF-8 and
  refuses other types with 415 and what to send instead (Parquet too: its reader is a parser of
  untrusted binary input this server does not need);
- parses the JSON itself first: invalid UTF-8, invalid or too deeply nested JSON, a lone surrogate,
  or an object without exactly one of MLflow's input keys get 400 and one line;

and for every path turns an error answer into `{"error_code": ..., "message": one line}`: MLflow's
`stack_trace` and any copy of the request are dropped (a server error's details go to the server log).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from http import HTTPStatus

log = logging.getLogger("src.guard")

JSON, CSV = "application/json", "text/csv"
INPUT_KEYS = ("inputs", "dataframe_split", "dataframe_records", "instances")  # MLflow's request formats
EXAMPLE = '{"inputs": {"text": ["a review", "another review"]}}'
# A valid request nests 5 levels at most ({"dataframe_split": {"data": [["text"]]}}); the limit keeps
# MLflow's own recursive parsing of what passes far from Python's recursion limit.
MAX_DEPTH = 16
MAX_LINE = 300  # characters of an error message: enough for the reason, too few to copy a request back
# MLflow's error answer copies the request into its message before the reason, so it is read whole up to
# this many times the body limit; beyond, it is summarised by its status alone.
ERROR_BODY_FACTOR = 8


class Refused(Exception):
    """A request answered here with `status` and one line, before MLflow sees it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client disconnected while its body was being read: nobody to answer."""


class Guard:
    def __init__(self, app, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        csv.field_size_limit(max_body)  # the csv module's default (128 KiB a field) would refuse long reviews

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = OneLineErrors(send, keep=ERROR_BODY_FACTOR * self.max_body)
        try:
            if scope["path"] == "/invocations" and scope["method"] == "POST":
                scope, receive = await self.checked(scope, receive)
            await self.app(scope, receive, answer)
        except Refused as exc:
            await respond(send, exc.status, str(exc))
        except ClientGone:
            return
        except Exception:
            log.exception("scoring failed")  # details for the operator; the client gets one line
            if not answer.started:
                await respond(send, 500, "internal error while scoring; the server log has the details")

    async def checked(self, scope, receive):
        """The request as MLflow will read it (a CSV body turned into JSON), or Refused."""
        mime, charset = content_type(scope)
        if mime not in (JSON, CSV) or charset not in ("", "utf-8"):
            shown = (mime + (f"; charset={charset}" if charset else ""))[:80] or "none"
            raise Refused(415, f"Content-Type {shown!r} is not accepted; send Content-Type: application/json "
                               f"with {EXAMPLE}, or text/csv (UTF-8) with a header row naming a text column")
        text = decode(await read_body(scope, receive, self.max_body))
        body = csv_as_json(text) if mime == CSV else check_json(text)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        return {**scope, "headers": headers}, replay(body, receive)


def content_type(scope) -> tuple[str, str]:
    """(media type, charset) of the request, lower case; '' for what is absent."""
    raw = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    mime, *params = [part.strip().lower() for part in raw.split(";")]
    charset = next((p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "")
    return mime, charset


async def read_body(scope, receive, limit: int) -> bytes:
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, too_large(int(declared), limit))  # before reading a byte of it
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(413, too_large(size, limit, more=True))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def too_large(size: int, limit: int, more: bool = False) -> str:
    mib = 1 << 20
    return (f"the request body is {'over ' if more else ''}{size / mib:.1f} MiB; this server takes at most "
            f"{limit / mib:g} MiB (python -m src.serve --max-body-mb): split the batch")


def replay(body: bytes, receive):
    """A `receive` that gives the body read here once, then defers to the client's (disconnects)."""
    sent = False

    async def inner():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return inner


def decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(400, f"the body is not valid UTF-8 (byte {exc.start}: {body[exc.start:exc.start + 1]!r}); "
                           f"send UTF-8 text") from None


def check_json(text: str) -> bytes:
    """The JSON body, parsed here first: what MLflow would choke on is refused with one line."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise Refused(400, f"the JSON is nested too deeply to read; send {EXAMPLE}") from None
    except ValueError as exc:  # JSONDecodeError names the place, never the content
        raise Refused(400, f"the body is not valid JSON ({str(exc)[:120]}); send {EXAMPLE}") from None
    if not isinstance(data, dict) or sum(key in data for key in INPUT_KEYS) != 1:
        raise Refused(400, f"the body must be a JSON object with exactly one of the keys {', '.join(INPUT_KEYS)}: "
                           f"{EXAMPLE}")
    check_values(data)
    return text.encode()


def check_values(data) -> None:
    """Nesting and strings, walked without recursion: no deeper than MAX_DEPTH, and valid Unicode (JSON's
    "\\ud800" escape decodes to half a surrogate pair, which no tokenizer can encode)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Refused(400, f"the JSON nests more than {MAX_DEPTH} levels deep; send {EXAMPLE}")
        if isinstance(value, str):
            check_unicode(value)
        elif isinstance(value, dict):
            stack.extend((key, depth + 1) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Refused(400, f"a string holds {text[exc.start]!r}, half of a UTF-16 surrogate pair and not a "
                           f"character; send valid Unicode text") from None


def csv_as_json(text: str) -> bytes:
    """A CSV body with a header row naming a `text` column, as the JSON MLflow reads: one text a row."""
    rows = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))  # a spreadsheet's byte order mark
    try:
        header = next(rows, None) or []
        records = [row for row in rows if row]  # blank lines are no rows
    except csv.Error as exc:
        raise Refused(400, f"the CSV cannot be read ({exc}); send RFC 4180 CSV with a header row") from None
    if "text" not in header:
        shown = ", ".join(repr(name[:40]) for name in header[:5]) or "none"
        raise Refused(400, f"the CSV has no text column (columns: {shown}); its first row must name the columns, "
                           f"e.g. text\\n\"A wonderful film.\"")
    column = header.index("text")
    short = next((n for n, row in enumerate(records, 2) if len(row) <= column), None)
    if short is not None:
        raise Refused(400, f"CSV line {short} has no text field (it has fewer fields than the header)")
    texts = [row[column] for row in records]
    return json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}).encode()


class OneLineErrors:
    """Wraps `send`: an answer with status >= 400 is replaced by {"error_code", "message"} whose
    message is one line of the original; MLflow's stack_trace and any copy of the request are dropped."""

    def __init__(self, send, keep: int) -> None:
        self.send, self.keep, self.started, self.status, self.body = send, keep, False, 0, bytearray()
        self.whole = True

    async def __call__(self, message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started, self.status = True, message["status"]
            if self.status < 400:
                await self.send(message)
            return
        if kind != "http.response.body" or self.status < 400:
            await self.send(message)
            return
        chunk = message.get("body", b"")
        self.whole = self.whole and len(self.body) + len(chunk) <= self.keep
        if self.whole:
            self.body += chunk
        if not message.get("more_body", False):
            await respond(self.send, self.status, *summary(bytes(self.body) if self.whole else b"", self.status))


def summary(body: bytes, status: int) -> tuple[str, str | None]:
    """One line saying why and MLflow's error code, from an error answer of MLflow's scoring app or
    of Starlette."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {"message": body.decode("utf-8", "replace")}
    data = data if isinstance(data, dict) else {}
    message = str(data.get("message") or data.get("detail") or "")
    code = data.get("error_code") if isinstance(data.get("error_code"), str) else None
    if data.get("stack_trace"):
        log.warning("HTTP %d; stack trace kept from the client:\n%s", status, data["stack_trace"])
    if status >= 500 and status != 504:  # internal details stay in the server log
        log.error("HTTP %d: %s", status, message[:2000])
        return "internal error while scoring; the server log has the details", None
    # MLflow prefixes the model's reason with the whole input: "Failed to predict data '<data>'. \nError: ..."
    message = message.rpartition("\nError: ")[2] if message.startswith("Failed to predict data") else message
    line = next((part.strip() for part in message.splitlines() if part.strip()), "")
    line = line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."
    return line or HTTPStatus(status).phrase, code


async def respond(send, status: int, message: str, code: str | None = None) -> None:
    if code is None:
        code = HTTPStatus(status).name if status in HTTPStatus._value2member_map_ else "ERROR"
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
