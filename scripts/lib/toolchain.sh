# Sourced by scripts/bench and scripts/test-all: makes sure a Rust toolchain
# (with clippy and rustfmt) and a C linker are present, installing them on a
# fresh Debian machine. A second run installs nothing.
ensure_toolchain() {
  if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "cargo not found: installing a stable toolchain with rustup"
      command -v curl >/dev/null || { apt-get update -q && apt-get install -y -q curl ca-certificates; }
      curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
      export PATH="$HOME/.cargo/bin:$PATH"
    fi
  fi
  if command -v rustup >/dev/null; then
    local c
    for c in clippy rustfmt; do
      rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
  fi
  command -v cc >/dev/null || { apt-get update -q && apt-get install -y -q build-essential; }
  cargo --version
}
