"""Bearer-token authentication: tokens read from a file, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
import stat
from pathlib import Path

from splitinfer.cloud._problem import Problem
from splitinfer.errors import ConfigError

__all__ = ["TokenSet", "check_authorization"]

log = logging.getLogger("splitinfer.cloud")

_MAX_TOKEN_FILE = 1 << 20


def _digest(token: str | bytes) -> bytes:
    # Comparing fixed-size digests keeps the comparison's time independent of the tokens' lengths.
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class TokenSet:
    """The tokens of a token file (one a line; blank lines and ``#`` comments are skipped).

    Only digests are kept in memory. :meth:`reload_if_changed` picks up a rotated file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._digests: tuple[bytes, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self.load()

    def __len__(self) -> int:
        return len(self._digests)

    def load(self) -> None:
        try:
            st = self.path.stat()
            if st.st_size > _MAX_TOKEN_FILE:
                raise ConfigError(f"token file {self.path} is larger than 1 MiB; it holds one token a line")
            text = self.path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read token file {self.path}: {exc}") from None
        tokens = [line.strip() for line in text.splitlines()]
        tokens = [t for t in tokens if t and not t.startswith("#")]
        if not tokens:
            raise ConfigError(f"token file {self.path} holds no token; write one token a line")
        if any(len(t) < 16 for t in tokens):
            log.warning(
                "token file %s holds tokens shorter than 16 characters; use long random ones", self.path
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by group or others; chmod 600 it", self.path)
        self._digests = tuple(_digest(t) for t in tokens)
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Reload when the file changed on disk; a broken new file keeps the old tokens."""
        try:
            st = self.path.stat()
        except OSError as exc:
            log.error("token file %s is gone (%s); keeping the tokens loaded before", self.path, exc)
            return False
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return False
        try:
            self.load()
        except ConfigError as exc:
            log.error("%s; keeping the tokens loaded before", exc)
            return False
        log.info("reloaded %d token(s) from %s", len(self._digests), self.path)
        return True

    def verify(self, token: str) -> bool:
        """Whether ``token`` is one of the tokens; every token is compared, whatever matches."""
        presented = _digest(token.encode("utf-8", "surrogateescape"))
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(presented, digest)
        return ok


def check_authorization(tokens: TokenSet, header: str | None) -> None:
    """Raise Problem unless ``header`` (the Authorization header) carries a valid bearer token."""
    challenge = {"WWW-Authenticate": 'Bearer realm="splitinfer"'}
    if not header:
        raise Problem("unauthorized", "send 'Authorization: Bearer <token>'", challenge)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem("unauthorized", "the Authorization header must be 'Bearer <token>'", challenge)
    if not tokens.verify(token.strip()):
        raise Problem("forbidden", "the bearer token is not valid here; check the token you were given")
