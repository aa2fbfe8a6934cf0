"""The user's call site: the right line for every call, also where it is remembered per code
object and instruction (a loop's launches), and where a freed code object's id is reused."""

from __future__ import annotations

import sys

from harp_jupyter.shim.callsite import user_call_site


def site_here() -> tuple[str, int, str] | None:
    return user_call_site(2)


def test_each_call_in_a_loop_names_its_own_line() -> None:
    seen = []
    for _ in range(3):
        first = site_here(); first_line = sys._getframe().f_lineno  # noqa: E702
        second = site_here(); second_line = sys._getframe().f_lineno  # noqa: E702
        seen.append((first, second))
    for first, second in seen:
        assert first == (__file__, first_line, "test_each_call_in_a_loop_names_its_own_line")
        assert second is not None and second[1] == second_line == first_line + 1


def test_code_objects_made_and_freed_in_turn_each_name_their_own_line() -> None:
    # a notebook compiles each cell anew: a freed cell's code object id is often reused by the
    # next one, whose line at the same instruction differs
    for blank_lines in [3, 1, 7, 2, 5] * 20:
        namespace = {"site_here": site_here}
        source = "\n" * blank_lines + "found = site_here()\n"
        exec(compile(source, "<cell>", "exec"), namespace)
        assert namespace["found"] == ("<cell>", blank_lines + 1, "<module>")
