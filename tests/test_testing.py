"""gateway_guard.testing: the helpers users test their apps with (FakeClock here)."""

from __future__ import annotations

import doctest
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import gateway_guard.testing
from gateway_guard.testing import FakeClock

SETTINGS_DOC = Path(__file__).parent.parent / "docs" / "settings.md"


def test_fake_clock_stands_still_until_moved() -> None:
    clock = FakeClock()
    assert clock() == clock() == clock.now == 1000.0
    clock.advance(2.5)
    assert clock() == 1002.5
    clock.sleep(0.5)
    assert clock() == 1003.0
    clock.sleep(-1.0)  # like time.sleep(0) for a negative wait: no move back
    assert clock() == 1003.0
    clock.now = 7.0  # set directly, backwards too: tests of clocks that step back
    assert clock() == 7.0
    assert FakeClock(0.0)() == 0.0
    assert repr(FakeClock(3)) == "FakeClock(now=3.0)"


def test_fake_clock_refuses_to_advance_backwards() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1.0)
    assert clock() == 1000.0


def test_fake_clock_loses_no_step_between_threads() -> None:
    clock = FakeClock(0.0)
    threads, steps = 8, 5000
    start = threading.Barrier(threads)

    def advance() -> None:
        start.wait()
        for _ in range(steps):
            clock.advance(1.0)

    workers = [threading.Thread(target=advance) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10.0)
    assert clock() == threads * steps


def test_fake_clock_is_exported() -> None:
    assert "FakeClock" in gateway_guard.testing.__all__
    assert gateway_guard.testing.__all__ == sorted(gateway_guard.testing.__all__)


def test_the_docstring_example_runs() -> None:
    results = doctest.testmod(sys.modules[FakeClock.__module__], raise_on_error=False)
    assert results.attempted >= 8
    assert results.failed == 0


def test_the_testing_section_of_the_settings_doc_runs() -> None:
    text = SETTINGS_DOC.read_text(encoding="utf-8")
    section = text.split("## Testing your app", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    namespace: dict[str, Any] = {"__name__": "doc_example"}
    exec(compile(block, str(SETTINGS_DOC), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0]()
