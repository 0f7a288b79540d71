# Shared machinery for the bad-input tables (test_bad_inputs.py, test_layer.py, test_dispatch.py).
"""A bad-input row is ``Case(id, call, exception type, message fragments)``.

The first fragment is checked with ``pytest.raises(match=...)``, the others must also appear in
the message; all are matched case-insensitively, and a fragment ending in a digit or ")" must not
be followed by another digit ("row 1" does not match "row 10", "(8, 1)" does not match "(8, 1)0").
"""

import re
from dataclasses import dataclass
from typing import Callable

import pytest
from child_utils import run_python


@dataclass
class Case:
    id: str
    call: Callable[[], object]
    exc: type
    fragments: tuple


def fragment_pattern(fragment):
    """Case-insensitive regex for ``fragment``; a trailing digit or ")" must not run on."""
    pattern = re.escape(fragment)
    if fragment[-1].isdigit() or fragment[-1] == ")":
        pattern += r"(?!\d)"
    return "(?i)" + pattern


def assert_raises_case(case):
    """``case.call()`` raises ``case.exc`` and the message holds every fragment."""
    first, *rest = case.fragments
    with pytest.raises(case.exc, match=fragment_pattern(first)) as info:
        case.call()
    message = str(info.value)
    for fragment in rest:
        assert re.search(fragment_pattern(fragment), message), (fragment, message)


def run_cases_in_child(module_name, table_name):
    """Call every row of ``module_name.table_name`` in a child process, ignoring exceptions.

    A segfault or abort in the child (or any row left unrun) is a failure here.
    """
    code = (
        f"import {module_name} as t\n"
        f"cases = t.{table_name}\n"
        "for c in cases:\n"
        "    try:\n"
        "        c.call()\n"
        "    except Exception:\n"
        "        pass\n"
        "print('survived', len(cases))\n"
    )
    done = run_python(code, timeout=300)
    assert done is not None, "the bad-input child did not finish within 300 s"
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "survived" in done.stdout, (done.stdout[-2000:], done.stderr[-2000:])
