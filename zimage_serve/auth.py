"""Bearer tokens: JWT signed HS256 with a secret file, or RS256 with a key pair. Claims: sub, exp, scope."""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt

from .config import Settings

SCOPES = ("generate", "admin")


class AuthError(Exception):
    """401: no token, a bad signature, an expired or malformed token."""


def signing_key(settings: Settings) -> tuple[str, str]:
    """(algorithm, key) to mint with."""
    if settings.jwt_secret_file:
        return "HS256", Path(settings.jwt_secret_file).read_text().strip()
    if settings.jwt_private_key_file:
        return "RS256", Path(settings.jwt_private_key_file).read_text()
    raise SystemExit("no key to sign with: set ZIMAGE_SERVE_JWT_SECRET_FILE (HS256) or ZIMAGE_SERVE_JWT_PRIVATE_KEY_FILE (RS256)")


def verifying_key(settings: Settings) -> tuple[str, str] | None:
    """(algorithm, key) to verify with; None when no key is configured (loopback only, no auth)."""
    if settings.jwt_secret_file:
        return "HS256", Path(settings.jwt_secret_file).read_text().strip()
    if settings.jwt_public_key_file:
        return "RS256", Path(settings.jwt_public_key_file).read_text()
    return None


def mint(settings: Settings, subject: str, scopes=("generate",), ttl: float = 86400.0) -> str:
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise SystemExit(f"unknown scope(s) {sorted(unknown)}; use {', '.join(SCOPES)}")
    algorithm, key = signing_key(settings)
    claims = {"sub": subject, "exp": int(time.time() + ttl), "scope": " ".join(scopes)}
    return jwt.encode(claims, key, algorithm=algorithm)


def verify(key: tuple[str, str], header: str | None) -> dict:
    """The claims of an `Authorization: Bearer ...` header; AuthError says what is wrong with it."""
    if not header or not header.lower().startswith("bearer "):
        raise AuthError("missing bearer token (Authorization: Bearer <token>)")
    algorithm, secret = key
    try:
        claims = jwt.decode(header[7:].strip(), secret, algorithms=[algorithm], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid token: {e}") from None
    return claims


def scopes_of(claims: dict) -> set[str]:
    scope = claims.get("scope", "")
    return set(scope.split() if isinstance(scope, str) else scope)


def new_secret(path: Path) -> Path:
    """A fresh HS256 secret, readable by its owner only (the `up` command's default key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(secrets.token_urlsafe(48))
    return path
