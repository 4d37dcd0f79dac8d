"""URLs that may carry a password (Optuna storage, MLflow tracking URI): masked for display, hashed
for identity, and every password seen scrubbed from text before it is printed or logged.

In an http(s) URL any user info is a credential: `https://TOKEN@host` carries a token as its user,
so a user without a password is masked and scrubbed like a password. Elsewhere a user alone is a
name (`postgresql://alice@db/optuna`, the password in PGPASSWORD) and stays visible.

Parsed with SQLAlchemy's URL object, which decodes percent-encoded passwords (`/` as %2F, `@` as
%40). Imported lazily: `--help` and argument errors stay instant.
"""

from __future__ import annotations

import hashlib
import os
import re
from urllib.parse import quote

# Query arguments that hold credentials (libpq takes `?password=`, others token/secret/key).
SECRET_QUERY = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)
MASK = "***"
HTTP = ("http", "https")
_SEEN: set[str] = set()  # every password mask() has met, raw and percent-encoded


def _make(url: str):
    """SQLAlchemy's reading of the URL, or None for text it cannot read (a file path)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def _parse(url: str):
    """SQLAlchemy's URL, with a raw '@' in the password put back into the password."""
    parsed = _make(url)
    if parsed is not None and parsed.host and "@" in parsed.host:
        # An unencoded '@' in the password: SQLAlchemy splits at the first one, so the rest of the
        # password would show as part of the host.
        spill, host = parsed.host.rsplit("@", 1)
        parsed = parsed.set(password=f"{parsed.password or ''}@{spill}", host=host)
    return parsed


def _token(parsed) -> str | None:
    """The user of an http(s) URL without a password: a token, not a name."""
    if parsed.drivername in HTTP and parsed.username and parsed.password is None:
        return parsed.username
    return None


def _remember(secret: str | None) -> None:
    # Shorter ones are masked in URLs but not scrubbed from free text, where "pw" would mangle words.
    if secret and len(secret) >= 4:
        _SEEN.update({secret, quote(secret, safe=""), quote(secret)})


def mask(url: str) -> str:
    """The URL with its password (and password-like query values) as ***; text that is not a URL
    comes back unchanged. Remembers the password so scrub() can remove it from any later text."""
    parsed = _parse(url)
    if parsed is None:
        if "://" in url and "@" in url:  # a URL SQLAlchemy cannot read: hide all that may be user info
            scheme, rest = url.split("://", 1)
            userinfo, host = rest.rsplit("@", 1)
            user, colon, password = userinfo.partition(":")
            _remember(password if colon else user if scheme.lower() in HTTP else None)
            return f"{scheme}://{MASK}@{host}"
        return url
    _remember(parsed.password)
    token = _token(parsed)
    if token:
        _remember(token)
        parsed = parsed.set(username=MASK)
    hidden = {k: MASK for k in parsed.query if SECRET_QUERY.search(k)}
    for k in hidden:
        values = parsed.query[k]
        for value in (values,) if isinstance(values, str) else values:
            _remember(value)
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True).replace(quote(MASK, safe=""), MASK)


def scrub(text: str) -> str:
    """Text with every password mask() has seen replaced by ***: for error lines and tracebacks,
    where a library may have echoed the URL it was given."""
    for secret in sorted(_SEEN, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def unencoded_at(url: str) -> bool:
    """True when the user info holds a raw '@': drivers split such a URL elsewhere than we do and
    echo the rest of the password as a host name in their errors."""
    raw = _make(url)
    if raw is None:
        return "://" in url and "@" in url
    return bool(raw.host and "@" in raw.host)


def backend(url: str) -> str:
    """'sqlite', 'postgresql', 'mysql', ... ('' for text that is not a URL)."""
    parsed = _parse(url)
    return parsed.get_backend_name() if parsed is not None else ""


def identity(url: str) -> str:
    """A short hash naming one storage: the masked URL, with relative sqlite and file paths made
    absolute. Equal for two workers on the same storage whatever their passwords or directories."""
    parsed = _parse(url)
    if parsed is None:
        canonical = os.path.abspath(url)
    elif parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        canonical = mask(parsed.set(database=os.path.abspath(parsed.database)).render_as_string(False))
    else:
        canonical = mask(url)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def holds_credentials(url: str) -> bool:
    """True when mask() would hide something: a password, an http(s) token or a secret query value."""
    parsed = _parse(url)
    if parsed is None:
        return "://" in url and "@" in url
    return (parsed.password is not None or _token(parsed) is not None
            or any(SECRET_QUERY.search(k) for k in parsed.query))


def without_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user info, the user, the password); the URL unchanged without user info.
    An http(s) token (`https://TOKEN@host`) comes back as the user, with password None."""
    parsed = _parse(url)
    if parsed is None or (not parsed.username and parsed.password is None):
        return url, None, None
    _remember(parsed.password)
    _remember(_token(parsed))
    bare = parsed._replace(username=None, password=None)  # URL.set() takes None as "keep"
    return bare.render_as_string(hide_password=False), parsed.username, parsed.password
