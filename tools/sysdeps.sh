#!/usr/bin/env bash
# System packages the end-to-end tests run for real: headless Chromium and its driver (error
# and status pages, axe-core), redis-server (the fleet backend), CJK fonts (pages in Japanese
# and Chinese render as text, not boxes, in screenshots). Installed only when missing; as root
# with apt-get, otherwise the missing names are printed and, under CI=true, the run stops.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(chromium chromium-driver redis-server fonts-noto-cjk)
missing=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "sysdeps: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "sysdeps: missing Debian packages: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
    [[ ${CI:-} == true ]] && exit 1
  fi
fi

# axe-core, the accessibility checker injected into pages by tests/browser.py.
axe=.venv/npm/node_modules/axe-core/axe.min.js
if [[ ! -f $axe ]]; then
  if command -v npm >/dev/null; then
    echo "sysdeps: installing axe-core with npm"
    npm install --silent --no-audit --no-fund --prefix .venv/npm axe-core@4 >/dev/null
  else
    echo "sysdeps: npm is missing, so axe-core cannot be installed" >&2
    [[ ${CI:-} == true ]] && exit 1
  fi
fi
exit 0
