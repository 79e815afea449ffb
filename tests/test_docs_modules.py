"""The docs' tables of a package's modules name every module of it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def table_after(doc: str, heading: str) -> str:
    """The first markdown table after `heading` in docs/`doc`."""
    text = (ROOT / "docs" / doc).read_text().split(heading, 1)[1]
    return re.search(r"^\|.*?(?=^[^|])", text, re.M | re.S).group(0)


def unlisted(package: str, table: str) -> list[str]:
    """The modules of `package` (a folder of the repository) that `table` does not name as `NAME.py`."""
    named = set(re.findall(r"`(\w+\.py)`", table))
    return sorted(p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py" and p.name not in named)


def test_the_servers_module_table_names_every_module_of_server():
    """docs/serving.md's "How it works (server/)" named 14 of server/'s 25 modules: where a request's
    head is timed (connections.py), a foreign page refused (origins.py), an offer checked (offers.py),
    sessions batched (batching.py) or the server shut down (uvicorn_server.py) was nowhere to be read."""
    table = table_after("serving.md", "## How it works (server/)")
    assert "`scheduler.py`" in table
    assert unlisted("server", table) == []


def test_the_avatar_worlds_module_table_names_every_module_of_streamgen_data():
    """docs/data.md's table left out sentences.py, manifest.py and cli.py."""
    table = table_after("data.md", "# The avatar world")
    assert "`render.py`" in table
    assert unlisted("streamgen/data", table) == []


def test_a_module_no_table_names_is_found():
    """The check can fail: a module the table does not name is said."""
    assert unlisted("server", "| `app.py` | the app |") == sorted(
        p.name for p in (ROOT / "server").glob("*.py") if p.name not in ("__init__.py", "app.py")
    )
