#!/usr/bin/env bash
# Installs everything the test suite needs, from the distribution's packages (SPEC §7).
# Idempotent and cheap when nothing is missing: apt is not touched at all then.
#   scripts/install-test-deps.sh          install what is missing
#   scripts/install-test-deps.sh --check  only report what is missing (exit 1 if anything)
set -euo pipefail

# tool -> Debian package that provides it
TOOLS=(
  "qemu-img:qemu-utils"
  "qemu-io:qemu-utils"
  "qemu-nbd:qemu-utils"
  "nbdinfo:libnbd-bin"
  "nbdcopy:libnbd-bin"
  "nbdfuse:nbdfuse"      # its own package on newer Debian; part of libnbd-bin on bookworm
  "nbdkit:nbdkit"
  "fio:fio"
  "etcd:etcd-server"
  "etcdctl:etcd-client"
  "ip:iproute2"
  "nft:nftables"          # network faults inside the cluster tests' namespaces
  "mkfs.ext4:e2fsprogs"
  "fsck.ext4:e2fsprogs"
  "fusermount3:fuse3"
  "protoc:protobuf-compiler"
  "jq:jq"
  "losetup:mount"
  "mount:mount"
  "sha256sum:coreutils"
  "python3:python3"
)

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/sbin/$1" ] || [ -x "/usr/sbin/$1" ]; }

missing_pkgs=()
missing_tools=()
for entry in "${TOOLS[@]}"; do
  tool=${entry%%:*}; pkg=${entry#*:}
  if ! have "$tool"; then
    missing_tools+=("$tool")
    [[ " ${missing_pkgs[*]-} " == *" $pkg "* ]] || missing_pkgs+=("$pkg")
  fi
done

if [ "${1-}" = "--check" ]; then
  if [ ${#missing_tools[@]} -eq 0 ]; then echo "test deps: all present"; exit 0; fi
  echo "test deps missing: ${missing_tools[*]}"; exit 1
fi

if [ ${#missing_pkgs[@]} -gt 0 ]; then
  echo "test deps: missing tools: ${missing_tools[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "error: need root (or sudo) to install: ${missing_pkgs[*]}" >&2; exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  # nbdfuse is a separate package only on some releases; elsewhere libnbd-bin ships it.
  pkgs=()
  for p in "${missing_pkgs[@]}"; do
    if [ "$p" = nbdfuse ] && ! apt-cache show nbdfuse >/dev/null 2>&1; then p=libnbd-bin; fi
    [[ " ${pkgs[*]-} " == *" $p "* ]] || pkgs+=("$p")
  done
  echo "test deps: apt-get install ${pkgs[*]}"
  $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}"
else
  echo "test deps: all tools present, apt skipped"
fi

# FUSE and loop devices for the ext4 test (present on these machines; say so if not).
[ -e /dev/fuse ] || echo "warning: /dev/fuse missing: the ext4 test will fail" >&2
[ -e /dev/loop-control ] || echo "warning: /dev/loop-control missing: the ext4 test will fail" >&2

# cargo-nextest is preinstalled on these machines; build it only if it is really missing.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test deps: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

"$0" --check
