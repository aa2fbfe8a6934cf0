"""Compare two JUnit XML results of pycuda's test suite: native vs through HARP's shim.

    python bench/pycuda_suite/compare.py native.xml shim.xml OUT.md "GPU name"
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:200] if text else ""
                break
        results[name] = (outcome, message)
    return results


def main() -> None:
    native, shim, out, gpu = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    a, b = outcomes(native), outcomes(shim)
    count_a, count_b = Counter(o for o, _ in a.values()), Counter(o for o, _ in b.values())
    lines = [
        f"# pycuda 2026.1's own tests, natively and through HARP's shim, on {gpu}",
        "",
        "test_driver.py, test_gpuarray.py and test_cumath.py from pycuda 2026.1, run with "
        "`pytest -n 8` on the GPU machine: once with local pycuda, once with "
        "`-p harp_jupyter.shim.pytest_plugin` against local pycuda agents "
        "(bench/pycuda_suite/run.sh).",
        "",
        "| | passed | failed | errors | skipped | total |",
        "|---|---|---|---|---|---|",
    ]
    for label, counts, results in (("native pycuda", count_a, a), ("through the shim", count_b, b)):
        lines.append(f"| {label} | {counts['passed']} | {counts['failed']} | {counts['error']} "
                     f"| {counts['skipped']} | {len(results)} |")
    lost = sorted(n for n, (o, _) in a.items() if o == "passed" and b.get(n, ("missing",))[0]
                  != "passed")
    gained = sorted(n for n, (o, _) in b.items() if o == "passed" and a.get(n, ("",))[0]
                    != "passed")
    lines += ["", f"## Pass natively, not through the shim ({len(lost)})", ""]
    lines += [f"- `{n}`: {b.get(n, ('missing', ''))[0]}: {b.get(n, ('', ''))[1]}" for n in lost]
    lines += ["", f"## Pass through the shim, not natively ({len(gained)})", ""]
    lines += [f"- `{n}`: natively {a.get(n, ('missing', ''))[0]}: {a.get(n, ('', ''))[1]}"
              for n in gained]
    text = "\n".join(lines) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
