"""Who may call the server: loopback only by default, a bearer token anywhere else.

The token is read from an environment variable (never a flag or the config file,
which end up in shell histories, process lists and repositories) and compared in
constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from deltavec.errors import ConfigError

DEFAULT_TOKEN_ENV = "DELTAVEC_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(host: str, token_env: str) -> str | None:
    """The token clients must send, or None on loopback without one.

    Raises:
        ConfigError: binding beyond loopback without a token in ``token_env``.
    """
    token = os.environ.get(token_env) or None
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"serving on {host} needs a bearer token: set {token_env} "
            "(clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1"
        )
    return token


def authorised(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries the token (always, when none is set)."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)
