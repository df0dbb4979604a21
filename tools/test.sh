#!/usr/bin/env bash
# Install what the tests need (system and Python packages) and run the whole suite.
# The README's test command and .ci/run both call exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."
# promtool lints the /metrics exposition (tests/test_metrics.py); Debian ships it in `prometheus`.
command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)
# Debian's Chromium: Playwright drives it for the live dashboard's browser tests (tests/test_dashboard_browser.py);
# Playwright's own browser download is never used.
command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)
# gcc: pip builds compute's C kernel, ingest's usual read and its record fill (setup.py;
# tests/test_compute_compiled.py, test_ingest_usual_chunk.py and test_ingest_rows.py check they are built).
command -v gcc >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev)
# Mesa's lavapipe: a Vulkan CPU adapter, so the WGSL compute kernels run against their numpy reference
# (tests/test_compute_wgsl.py) on machines without a GPU. NODEVICE_SELECT and XDG_RUNTIME_DIR quiet its stderr.
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 \
    || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1)
export NODEVICE_SELECT=1
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"
    export XDG_RUNTIME_DIR
    trap 'rm -rf "$XDG_RUNTIME_DIR"' EXIT  # ours: not left behind in /tmp (one per run, before)
fi
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# The llamacpp extra: a real llama.cpp server for tests/test_llamacpp_upstream.py (docs/upstreams.md).
# llama-cpp-python builds from source (4-5 minutes on 2 cores; pip's wheel cache keeps the build), so
# the step is skipped when it imports already.
python3 -c 'import llama_cpp.server.app, gguf' 2>/dev/null \
    || CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF" \
        python3 -m pip install --quiet --disable-pip-version-check -e '.[llamacpp]'
python3 -m ruff check .
python3 -m ruff format --check .
# the layering contracts in .importlinter (through python3: a fresh pyenv has no shim for lint-imports yet)
python3 -c 'from importlinter.cli import lint_imports_command; lint_imports_command()'
# the alert and recording rules: checked and unit-tested by promtool (tests/test_rules.py runs the same)
promtool check rules engine/monitoring/*.yml >/dev/null
promtool test rules tests/promtool/*_test.yml
python3 -m pytest "$@"
