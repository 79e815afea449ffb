"""The README and docs/ point at files that exist: benchmark JSON, plots, each other."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown [text](target), anchor dropped


def broken_links(doc: Path) -> list[str]:
    targets = (m.group(1) for m in LINK.finditer(doc.read_text()))
    return [t for t in targets if "://" not in t and not (doc.parent / t).exists()]


def test_relative_links_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = {str(d.relative_to(ROOT)): b for d in docs if (b := broken_links(d))}
    assert broken == {}


def test_a_missing_target_is_reported(tmp_path):
    (tmp_path / "here.json").write_text("{}")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](here.json) [anchor](here.json#x) [web](https://example.com) [gone](../bench/nope.json)"
    )
    assert broken_links(doc) == ["../bench/nope.json"]


def test_every_server_metric_is_in_the_api_doc():
    """A metric added to server/metrics.py is listed in docs/api.md's /metrics paragraph."""
    from server.metrics import ServerMetrics

    api = (ROOT / "docs" / "api.md").read_text()
    families = {m.name for m in ServerMetrics().registry.collect()}
    ours = {n for n in families if n.startswith("streamgen_")}
    assert ours, families  # (the registry's names, so the check below checks something)
    # a counter's family is named without the `_total` its samples carry, as the doc writes them
    assert sorted(n for n in ours if n not in api) == []
