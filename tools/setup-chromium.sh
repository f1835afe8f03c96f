#!/usr/bin/env bash
# Browser tests drive Debian's chromium through Playwright (Playwright's own browser download cannot work offline).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
  else
    echo "chromium is missing: install Debian's chromium package (browser tests will be skipped)" >&2
  fi
fi
