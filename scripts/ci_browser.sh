#!/usr/bin/env bash
# Browser tests of the web client (tests/test_server_browser*.py) in Debian's headless chromium
# (and those of what browsers do each their own way in firefox-esr too: tests/firefox_pages.py).
# Installs chromium with apt where it is missing and apt is usable; otherwise the test
# skips itself with a message saying why. Usage: scripts/ci_browser.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "ci_browser: installing chromium (apt-get install -y chromium)"
        (apt-get install -y chromium || (apt-get update && apt-get install -y chromium)) >/tmp/ci_browser_apt.log 2>&1 \
            || echo "ci_browser: apt could not install chromium (see /tmp/ci_browser_apt.log); the browser test will skip"
    else
        echo "ci_browser: /usr/bin/chromium missing and apt-get unavailable (or not root); the browser test will skip"
    fi
fi

# the TURN test streams through Debian's coturn; without it that test skips
if [ ! -x /usr/bin/turnserver ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get install -y coturn >/tmp/ci_browser_coturn_apt.log 2>&1 \
        || echo "ci_browser: apt could not install coturn (see /tmp/ci_browser_coturn_apt.log); the TURN test will skip"
fi

# the Firefox tests run Debian's firefox-esr (Playwright's Firefox build may not download); without it, they skip
if [ ! -x /usr/bin/firefox-esr ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get install -y firefox-esr >/tmp/ci_browser_firefox_apt.log 2>&1 \
        || echo "ci_browser: apt could not install firefox-esr (see /tmp/ci_browser_firefox_apt.log); the Firefox tests will skip"
fi

exec "$PY" -m pytest tests/test_server_browser*.py -m browser -q -rs "$@"
