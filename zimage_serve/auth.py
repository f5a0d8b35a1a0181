"""Bearer tokens: JWT signed HS256 with a secret file, or RS256 with a key pair. Claims: sub, exp, scope."""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt

from .config import Settings

SCOPES = ("generate", "admin")
MIN_SECRET_BYTES = 32  # a shorter HS256 secret can be found by brute force


class AuthError(Exception):
    """401: no token, a bad signature, an expired or malformed token."""


def read_secret(path) -> str:
    """An HS256 secret file's secret; a missing, short or empty one is refused, with what to do."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise SystemExit(f"cannot read the JWT secret file {path}: {e.strerror}") from None
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise SystemExit(f"the JWT secret in {path} is {len(secret.encode())} bytes; give at least {MIN_SECRET_BYTES} "
                         "random bytes (python -c 'import secrets; print(secrets.token_urlsafe(48))' > FILE)")
    return secret


def read_pem(path, what: str) -> str:
    """A PEM key file that PyJWT can use for RS256 (checked now, not at the first request)."""
    from jwt.algorithms import RSAAlgorithm

    try:
        text = Path(path).read_text()
        key = RSAAlgorithm(RSAAlgorithm.SHA256)
        key.prepare_key(text)
    except OSError as e:
        raise SystemExit(f"cannot read the JWT {what} file {path}: {e.strerror}") from None
    except (ValueError, TypeError, jwt.PyJWTError) as e:
        raise SystemExit(f"the JWT {what} file {path} is not an RSA {what} in PEM form ({e})") from None
    return text


def signing_key(settings: Settings) -> tuple[str, str]:
    """(algorithm, key) to mint with."""
    if settings.jwt_secret_file:
        return "HS256", read_secret(settings.jwt_secret_file)
    if settings.jwt_private_key_file:
        return "RS256", read_pem(settings.jwt_private_key_file, "private key")
    raise SystemExit("no key to sign with: set ZIMAGE_SERVE_JWT_SECRET_FILE (HS256) or ZIMAGE_SERVE_JWT_PRIVATE_KEY_FILE (RS256)")


def verifying_key(settings: Settings) -> tuple[str, str] | None:
    """(algorithm, key) to verify with; None when no key is configured (loopback only, no auth)."""
    if settings.jwt_secret_file:
        return "HS256", read_secret(settings.jwt_secret_file)
    if settings.jwt_public_key_file:
        return "RS256", read_pem(settings.jwt_public_key_file, "public key")
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
    except jwt.PyJWTError as e:  # a bad signature, a malformed token or claim, an algorithm not allowed
        raise AuthError(f"invalid token: {e}") from None
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise AuthError("invalid token: its sub claim is not a name")
    return claims


def scopes_of(claims: dict) -> set[str]:
    """The token's scopes: a space-separated string (or a list of strings); anything else grants none."""
    scope = claims.get("scope", "")
    if isinstance(scope, str):
        return set(scope.split())
    if isinstance(scope, list):
        return {s for s in scope if isinstance(s, str)}
    return set()


def new_secret(path: Path) -> Path:
    """A fresh HS256 secret, readable by its owner only (the `up` command's default key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(secrets.token_urlsafe(48))
    return path
