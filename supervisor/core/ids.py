"""Swap ids: one syntax for every place an id travels.

An id names a swap in the API's paths, in notify datagrams, in git refs
(`refs/swapguard/<kind>/<id>`), in snapshot folders and in `<path>.rolled-back-<id>`, so it must be
a plain name in all of them: letters, digits, '_' and '-', a letter or digit first. No '.': no id
is then a path step ('.', '..'), a hidden file or a ref name git refuses ('a..b', 'x.lock').
`supervisor.clock.new_id` makes them; everything else only checks them, with `is_swap_id`.
"""

from __future__ import annotations

import re
from typing import TypeGuard

SWAP_ID_SYNTAX = "1-64 letters, digits, '_' or '-', the first a letter or digit"
"""The rule in words, for the error messages of every layer that refuses an id."""

_SWAP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def is_swap_id(value: object) -> TypeGuard[str]:
    """Whether `value` is a string in swap-id syntax (any type may be asked: input is untrusted)."""
    return isinstance(value, str) and _SWAP_ID.fullmatch(value) is not None
