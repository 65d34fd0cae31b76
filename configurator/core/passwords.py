"""The policy for new passwords: long enough, not a common password, not the account's own name.

Rate limits slow online guessing down; they do not help an account whose password is on every
attacker's first page of guesses. The list is `configurator/resources/common-passwords.txt` (its origin
and licence: `common-passwords.LICENSE` beside it), compared case-insensitively. Only new passwords
are checked (registration); existing accounts keep working.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

COMMON_PASSWORDS = "common-passwords.txt"


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The bundled list, read once per process."""
    text = resources.files("configurator").joinpath("resources", COMMON_PASSWORDS).read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def password_problem(password: str, *, min_length: int, username: str, email: str) -> str | None:
    """Why `password` may not be used for the account (username, email), or None when it may."""
    if len(password) < min_length:
        return f"password must be at least {min_length} characters long"
    folded = password.strip().lower()
    own_names = {username.lower(), email.lower(), email.partition("@")[0].lower()}
    if folded in own_names:
        return "password must not be the username or email"
    if folded in common_passwords():
        return "password is too common (it appears in lists of leaked passwords); choose another"
    return None
