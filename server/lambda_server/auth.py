"""Who is calling: JWT bearer tokens (PyJWT) turned into a Caller, and the scopes a call needs.

AUTH_MODE=none: every caller is anonymous and may do everything.
AUTH_MODE=jwt: a call carries `authorization: Bearer <token>`, signed HS256 with
JWT_SECRET or RS256 with JWT_PUBLIC_KEY; `sub` is the user, and the scopes come
from `scope` (space-separated, as in OAuth 2) or `scopes` (a list).
"""

from __future__ import annotations

import jwt

from lambda_server.config import AuthSettings
from lambda_server.domain import Caller
from lambda_server.errors import Forbidden, Unauthenticated

EXECUTE_ALL = "execute:all"
READ_FUNCTIONS = "read:functions"
# What an anonymous caller may do when authentication is off: everything.
_EVERYTHING = frozenset({EXECUTE_ALL, READ_FUNCTIONS})
# A subject is stored with what it owns (user_id columns are varchar(255), text cannot
# hold NUL): one that cannot be is refused here, at the door, never by PostgreSQL.
MAX_SUBJECT_CHARS = 255


class Authenticator:
    """Turns the `authorization` metadata of a call into a Caller, or refuses it."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        if settings.jwt_public_key:
            self._key: str = settings.jwt_public_key
            self._algorithms = ["RS256"]
        else:
            self._key = settings.jwt_secret or ""
            self._algorithms = ["HS256"]

    @property
    def enabled(self) -> bool:
        return self._settings.mode == "jwt"

    def authenticate(self, authorization: str | None, address: str = "") -> Caller:
        if not self.enabled:
            return Caller(None, _EVERYTHING, address)
        if not authorization:
            raise Unauthenticated("this call needs an `authorization: Bearer <token>` header")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization header must be `Bearer <token>`")
        try:
            claims = jwt.decode(
                token.strip(),
                self._key,
                algorithms=self._algorithms,
                audience=self._settings.jwt_audience,
                issuer=self._settings.jwt_issuer,
                options={"require": ["sub", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the token is not valid: {exc}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the token's `sub` must name the user")
        if "\x00" in subject:
            raise Unauthenticated("the token's `sub` contains a NUL character", problem="sub_nul")
        if not subject.isprintable() and not _encodable(subject):
            raise Unauthenticated("the token's `sub` is not valid Unicode", problem="sub_not_unicode")
        if len(subject) > MAX_SUBJECT_CHARS:
            raise Unauthenticated(
                f"the token's `sub` is {len(subject)} characters, over {MAX_SUBJECT_CHARS}",
                problem="sub_too_long",
                limit=str(MAX_SUBJECT_CHARS),
            )
        return Caller(subject, _scopes(claims), address)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate, as JSON's \ud800 decodes to
        return False
    return True


def _scopes(claims: dict[str, object]) -> frozenset[str]:
    scopes: set[str] = set()
    raw = claims.get("scope")
    if isinstance(raw, str):
        scopes.update(raw.split())
    listed = claims.get("scopes")
    if isinstance(listed, list):
        scopes.update(item for item in listed if isinstance(item, str))
    return frozenset(scopes)


def require_execute(caller: Caller, runtime: str) -> None:
    """Initialize and Execute need `execute:all` or `execute:<runtime>`."""
    if EXECUTE_ALL not in caller.scopes and f"execute:{runtime}" not in caller.scopes:
        raise Forbidden(
            f"running {runtime} scripts needs the scope {EXECUTE_ALL} or execute:{runtime}",
            scope=f"execute:{runtime}",
        )


def require_read_functions(caller: Caller) -> None:
    if READ_FUNCTIONS not in caller.scopes:
        raise Forbidden(f"reading the catalog needs the scope {READ_FUNCTIONS}", scope=READ_FUNCTIONS)
