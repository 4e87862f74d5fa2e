"""Checked by mypy --strict in test_resources.py: a `Resource[T]` parameter is a `T` to a type checker."""

from __future__ import annotations

from typing import assert_type

import stoppoint as sp

flow = sp.Flow("typed")


class Client:
    async def get(self, url: str) -> int:
        return len(url)


@flow.step
async def fetch(http: sp.Resource[Client], url: str) -> int:
    assert_type(http, Client)
    return await http.get(url)
