#!/usr/bin/env bash
# Headless Chromium for tests/test_ui.py: it opens the MLflow UI that `cxr-sweep ui` starts and checks
# that a sweep's parent and child runs show. Only the browser is needed (no display server: the test
# runs it with --headless). Idempotent: nothing happens when chromium is already installed. Run as root
# on Debian.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --headless --no-sandbox --disable-gpu --dump-dom about:blank >/dev/null 2>&1
echo "chromium: $(chromium --version 2>/dev/null)"
