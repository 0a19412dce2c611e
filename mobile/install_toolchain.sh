#!/usr/bin/env bash
# Installs the ARM cross compiler, qemu-user and clang (ASan/UBSan) when missing and we are root with apt.
# Elsewhere it only reports what is missing; the tests that need them then skip locally (and fail in CI).
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v clang >/dev/null || need+=(clang)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need[*]} (apt)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null \
    || echo "warning: apt-get install ${need[*]} failed" >&2
else
  echo "warning: missing ${need[*]} (not root / no apt): ARM and sanitizer tests will skip" >&2
fi
exit 0
