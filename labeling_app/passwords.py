"""Password hashing for annotator accounts: scrypt from the standard library, salt per user.

A stored hash reads `scrypt$N$r$p$salt$key` (hex), so the cost can be raised later and
old hashes still verify. N=2**14, r=8, p=1 are the scrypt paper's interactive-login
parameters: about 90 ms and 16 MiB per check on one core here, which a login pays once
(the session cookie carries it after that) and a password guesser pays on every try.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

N, R, P = 2**14, 8, 1
KEY_BYTES = 32
MIN_LENGTH = 8

# Checked when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY = None


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, N, R, P)
    return f"scrypt${N}${R}${P}${salt.hex()}${key.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    global _DUMMY
    if stored is None:
        _DUMMY = _DUMMY or hash_password(secrets.token_hex(8))
        verify_password(password, _DUMMY)
        return False
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(key)
        got = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem: 128 * r * n bytes plus slack, so a raised N does not trip OpenSSL's 32 MiB default.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES,
                          maxmem=256 * r * n + (1 << 20))
