"""benchmarks/code_bytes.py's executed-lines floor deletes exactly the statements no run line fell in
(the figure behind issue 14's "bytes_code <= 30,000 is under what one run executes").

    .venv/bin/python -m pytest -q tests/test_code_bytes_floor.py
"""

from __future__ import annotations

import ast
import sys
import textwrap

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from code_bytes import _OnlyExecuted  # noqa: E402

SOURCE = textwrap.dedent("""\
    import os
    def used(x):
        if x:
            return helper(
                x)
        else:
            raise ValueError("never")
    def unused():
        return 1
    class C:
        def m(self):
            pass
""")


def test_only_executed_keeps_run_lines_and_empties_unrun_bodies():
    # Lines 1-5 and the class line ran: `helper(\n x)` counts from any of its lines (5 here).
    out = ast.unparse(_OnlyExecuted({1, 2, 3, 5, 8, 10}).visit(ast.parse(SOURCE)))
    assert out == textwrap.dedent("""\
        import os

        def used(x):
            if x:
                return helper(x)

        def unused():
            pass

        class C:
            pass""")
