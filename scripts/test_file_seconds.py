"""Each test file's seconds in a run, for the order `./run test` hands files to its workers
(tests/conftest.py): longest first.

    .venv/bin/python -m pytest -n 2 --dist loadfile --junitxml=/tmp/run.xml
    .venv/bin/python scripts/test_file_seconds.py /tmp/run.xml --out tests/file_seconds.json

(--out writes the file once the run's XML has been read, whole or not at all: a shell's
`> tests/file_seconds.json` emptied it before a mistyped path's error.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/test_file_seconds.py",
        description="each test file's seconds in a pytest run: tests/file_seconds.json, the order of ./run test's files",
    )
    parser.add_argument("junit_xml", help="the --junitxml file of a pytest run")
    parser.add_argument("--out", help="the JSON file to write (default: none, the JSON on stdout)")
    args = parser.parse_args(argv)
    try:
        seconds = file_seconds(args.junit_xml)
    except (OSError, ET.ParseError) as e:  # (a traceback, and `> FILE` had emptied FILE already)
        parser.error(f"cannot read {args.junit_xml} as a pytest --junitxml file: {getattr(e, 'strerror', None) or e}")
    if not seconds:
        parser.error(f"{args.junit_xml} holds no test of a tests/test_*.py file: not a pytest run's --junitxml?")
    text = json.dumps({"total_s": round(sum(seconds.values()), 1), "seconds": seconds}, indent=1) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    temp = f"{args.out}.{os.getpid()}.tmp"
    try:
        with open(temp, "w") as f:
            f.write(text)
        os.replace(temp, args.out)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        parser.error(f"cannot write {args.out}: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
