#!/usr/bin/env bash
# The native tools the engine's tests need, each checked by what the tests actually do with it (a link, not a
# `command -v`: clang without its sanitizer runtimes is on PATH but cannot link an ASan build):
#   aarch64 cross build  static link of a C file   gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#   qemu-user            qemu-aarch64 on PATH       qemu-user
#   clang                clang on PATH              clang
#   ASan + UBSan         clang -fsanitize link      libclang-rt-<clang major>-dev (Debian 12: libclang-rt-14-dev)
# As root with apt it installs what is missing (clang first, then the runtime package of the clang it got) and
# fails, naming the packages, when apt cannot install them or a probe still fails afterwards. Without root/apt it
# names what is missing: an error in CI (CI=true, where a skipped test would fail anyway), a warning elsewhere
# (those tests then skip locally).
#   usage: install_toolchain.sh [--check]     --check: install nothing, exit 1 if anything is missing
set -u
check_only=0
[ "${1:-}" = "--check" ] && check_only=1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'int main(void) { return 0; }\n' >"$tmp/t.c"

clang_major() { clang -dumpversion 2>/dev/null | cut -d. -f1; }

# probe NAME -> 0 when usable
probe() {
  case $1 in
    cross) aarch64-linux-gnu-gcc -static "$tmp/t.c" -o "$tmp/a" >/dev/null 2>&1 ;;
    qemu) command -v qemu-aarch64 >/dev/null 2>&1 ;;
    clang) command -v clang >/dev/null 2>&1 ;;
    sanitizers) clang -fsanitize=address,undefined "$tmp/t.c" -o "$tmp/s" >/dev/null 2>&1 ;;
  esac
}

# packages NAME -> the Debian packages that provide it
packages() {
  case $1 in
    cross) echo "gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
    qemu) echo "qemu-user" ;;
    clang) echo "clang" ;;
    sanitizers) echo "libclang-rt-$(clang_major)-dev" ;;
  esac
}

missing() {  # the requirements whose probe fails, in install order
  local m=()
  for r in cross qemu clang sanitizers; do
    if [ "$r" = sanitizers ] && ! probe clang; then m+=(sanitizers); continue; fi
    probe "$r" || m+=("$r")
  done
  echo "${m[*]:-}"
}

say_missing() {  # $1 = error|warning, $2.. = requirements
  local level=$1; shift
  for r in "$@"; do
    local pk
    pk=$(packages "$r")
    [ "$r" = sanitizers ] && ! probe clang && pk="libclang-rt-<clang version>-dev (after clang)"
    echo "$level: $r is missing or does not work; Debian package(s): $pk" >&2
  done
}

read -r -a need <<<"$(missing)"
[ ${#need[@]} -eq 0 ] && exit 0
if [ $check_only = 1 ]; then
  say_missing error "${need[@]}"
  exit 1
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
    say_missing error "${need[@]}"
    echo "error: CI needs these tools (run this script as root on Debian/Ubuntu)" >&2
    exit 1
  fi
  say_missing warning "${need[@]}"
  echo "warning: not root / no apt: the ARM and sanitizer tests will skip here (and fail in CI)" >&2
  exit 0
fi

apt_install() {
  echo "installing $* (apt)"
  local log="$tmp/apt.log"
  if ! { [ -n "${_apt_updated:-}" ] || apt-get update -qq; } >"$log" 2>&1 \
     || ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1; then
    tail -n 5 "$log" >&2
    echo "error: apt-get install $* failed" >&2
    exit 1
  fi
  _apt_updated=1
}

# Pass 1: everything except the sanitizer runtimes, whose package name depends on the clang that gets installed.
pk=()
for r in "${need[@]}"; do
  [ "$r" != sanitizers ] && read -r -a p <<<"$(packages "$r")" && pk+=("${p[@]}")
done
[ ${#pk[@]} -gt 0 ] && apt_install "${pk[@]}"
# Pass 2: the runtimes for the clang now on PATH.
probe clang && ! probe sanitizers && apt_install "$(packages sanitizers)"

read -r -a still <<<"$(missing)"
if [ ${#still[@]} -gt 0 ]; then
  say_missing error "${still[@]}"
  echo "error: installed packages but the probes above still fail" >&2
  exit 1
fi
exit 0
