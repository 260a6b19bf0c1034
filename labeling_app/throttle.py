"""Login throttling: backoff per account and per client address, then a lockout per account.

Failed logins are rows in the label database (`LabelStore.record_login_failure`), so a restart
forgets none. Before a password is checked at all:

- **lockout**: an account with `LOCK_AFTER` (10) failures within `WINDOW` (15 minutes) is locked
  until the 10th most recent of them is 15 minutes old; `align label users unlock NAME` clears it;
- **backoff**: after n failures within the window, for the account or from the client address
  (whichever has more), the next try waits `backoff(n)` seconds after the last one: 0.5 s, 1, 2, 4 ...
  up to 30 s.

A try refused by either is answered at once, without running scrypt and without being counted, so
parallel guessing gets one check per backoff step instead of one per request, and a locked account
stays locked for its 15 minutes rather than for as long as someone keeps trying. A good password
clears the account's failures. Logins are decided and checked one at a time (`LabelingApp.login`
holds a lock from the verdict to the recorded failure), so parallel guesses each see the failures
before them, and guessers queue behind each other instead of taking the threads that store votes.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

LOCK_AFTER = 10
WINDOW = 15 * 60.0
BASE_DELAY = 0.5
MAX_DELAY = 30.0

# The client address of the request being served (set by `ClientAddress`; Gradio's /login awaits our auth
# function in the same task, which is how it learns the address Gradio does not pass).
CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar("client_address", default="unknown")


def backoff(failures: int) -> float:
    """Seconds the next try waits after the last failure, given `failures` within the window."""
    return 0.0 if failures <= 0 else min(MAX_DELAY, BASE_DELAY * 2 ** (failures - 1))


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    wait: float = 0.0  # seconds until a try is allowed again
    locked: bool = False


def decide(account_failures: list[float], address_failures: list[float], now: float) -> Verdict:
    """Whether a login may be checked now, from the failure times (ascending, within the window) of the account
    and of the client address."""
    recent = [t for t in account_failures if t > now - WINDOW]
    if len(recent) >= LOCK_AFTER:
        return Verdict(False, recent[-LOCK_AFTER] + WINDOW - now, locked=True)
    from_address = [t for t in address_failures if t > now - WINDOW]
    n = max(len(recent), len(from_address))
    if n == 0:
        return Verdict(True)
    last = max(recent[-1:] + from_address[-1:])
    wait = last + backoff(n) - now
    return Verdict(True) if wait <= 0 else Verdict(False, wait)


class ClientAddress:
    """ASGI middleware: `CLIENT_ADDRESS` holds the connecting address for the request's task."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("client"):
            CLIENT_ADDRESS.set(scope["client"][0])
        await self.app(scope, receive, send)
