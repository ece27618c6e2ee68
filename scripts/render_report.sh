#!/usr/bin/env bash
# Render a run's report in headless Chromium and save a screenshot, to check the page by eye.
#
#   scripts/render_report.sh RUN_DIR [SCREENSHOT.png] [WIDTHxHEIGHT]
#
# Writes RUN_DIR/report.html first if it is missing (semiseg report RUN_DIR). Needs chromium
# (Debian: apt-get install chromium; elsewhere chromium-browser or google-chrome).
set -euo pipefail
run_dir=${1:?usage: $0 RUN_DIR [SCREENSHOT.png] [WIDTHxHEIGHT]}
shot=${2:-$run_dir/report_screenshot.png}
size=${3:-1200x3200}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "render_report.sh: no chromium found (apt-get install chromium)" >&2
    exit 3
fi
if [ ! -f "$run_dir/report.html" ]; then
    python -m semiseg report "$run_dir"
fi
page=$(cd "$(dirname "$run_dir/report.html")" && pwd)/report.html
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$(mktemp -d)" \
    --window-size="${size/x/,}" --screenshot="$shot" "file://$page" >/dev/null 2>&1
test -s "$shot"
echo "wrote $shot"
