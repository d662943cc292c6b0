"""Run code that might hang (a forward waiting on a prefetch thread, a load after a fault) without hanging
the suite."""

from __future__ import annotations

import threading
from typing import Any, Callable


def with_timeout(fn: Callable[[], Any], seconds: float = 30.0) -> Any:
    """Run `fn` on a thread and fail instead of hanging the suite; exceptions (even BaseException) come back."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:  # handed back to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"hung for {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
