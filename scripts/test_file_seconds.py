"""Each test file's seconds in a run, for the order `./run test` hands files to its workers
(tests/conftest.py): longest first.

    .venv/bin/python -m pytest -n 2 --dist loadfile --junitxml=/tmp/run.xml
    .venv/bin/python scripts/test_file_seconds.py /tmp/run.xml > tests/file_seconds.json
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def file_seconds(junit_xml: str) -> dict[str, float]:
    """Seconds per test file (setup, call and teardown of its tests: junit's `time`), longest first."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        # classname is the module's dotted path and class: tests.test_x or tests.test_x.TestY
        parts = case.get("classname", "").split(".")
        module = next((i for i, p in enumerate(parts) if p.startswith("test_")), None)
        if module is not None:
            seconds["/".join(parts[: module + 1]) + ".py"] += float(case.get("time") or 0)
    return dict(sorted(((f, round(s, 1)) for f, s in seconds.items()), key=lambda fs: -fs[1]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    seconds = file_seconds(sys.argv[1])
    print(json.dumps({"total_s": round(sum(seconds.values()), 1), "seconds": seconds}, indent=1))
