#!/usr/bin/env bash
# `make test-aarch64`: the edge runtime's tests on an emulated arm64 Debian userland, plus the
# numeric parity of one bundle arm64 vs this machine (x86).
#
# Opt-in (not in .ci/run): it needs root, installs qemu-user-static + debootstrap, mounts
# binfmt_misc and registers qemu-aarch64 system-wide. The userland is built once (~7.5-13 min) under
# $ARM64_ROOT and reused; later runs only refresh the package (~3 min) and run the tests
# (~2 min on idle cores; 5.5 min measured at load 12).
#
# Two traps this script handles:
#  1. onnxruntime crashes on import under qemu-user 7.2: its CPU detection reads /proc/cpuinfo and
#     /sys and finds x86 fields (1.32.0 segfaults; without /sys, 1.23.2 aborts). The chroot gets
#     /sys and a small fake arm64 /proc/cpuinfo bind-mounted over the real one.
#  2. qemu's default emulated CPU ("max") is ~20x slower here than QEMU_CPU=neoverse-n1.
# The apt mirror comes from this machine's apt configuration; pip in the chroot uses PyPI's default
# index with this machine's CA bundle (the host pip config may point at local x86-only wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
ARM64_ROOT=${ARM64_ROOT:-/var/tmp/collafuse-arm64}
SUITE=${ARM64_SUITE:-bookworm}
export QEMU_CPU=${QEMU_CPU:-neoverse-n1}
PYTHON=${PYTHON:-python3}
OUT=${ARM64_OUT:-$REPO/build/aarch64}
mkdir -p "$OUT"

say() { printf '[test-aarch64 %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, mount, binfmt_misc); run it as root or with sudo"
[ "$(uname -m)" = x86_64 ] || say "note: this machine is $(uname -m), not x86_64; the parity check compares against it"

# -- tools ---------------------------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing qemu-user-static and debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap >/dev/null
fi
QEMU=$(command -v qemu-aarch64-static)

# -- binfmt_misc ---------------------------------------------------------------------------------
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  say "mounting binfmt_misc"
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  say "registering qemu-aarch64 (F: the interpreter is opened now, so the chroot needs no copy)"
  printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$QEMU"':F' \
    > /proc/sys/fs/binfmt_misc/register
fi

# -- mirror from the host's apt configuration ----------------------------------------------------
mirror() {
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

# -- the userland (built once) -------------------------------------------------------------------
umount_all() {
  for p in proc/cpuinfo proc dev/pts dev sys; do
    mountpoint -q "$ARM64_ROOT/$p" 2>/dev/null && umount -l "$ARM64_ROOT/$p" || true
  done
}
trap umount_all EXIT

if [ ! -f "$ARM64_ROOT/.collafuse-ready" ]; then
  MIRROR=$(mirror)
  say "building an arm64 $SUITE userland in $ARM64_ROOT from $MIRROR (once; ~7.5 min)"
  umount_all
  rm -rf "$ARM64_ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ARM64_ROOT" "$MIRROR" > "$OUT/debootstrap.log" 2>&1 \
    || { tail -20 "$OUT/debootstrap.log" >&2; die "debootstrap failed (log: $OUT/debootstrap.log)"; }
  touch "$ARM64_ROOT/.collafuse-ready"
fi

# -- mounts: proc with a fake arm64 cpuinfo, dev, sys --------------------------------------------
mountpoint -q "$ARM64_ROOT/proc" || mount -t proc proc "$ARM64_ROOT/proc"
mountpoint -q "$ARM64_ROOT/dev" || mount --bind /dev "$ARM64_ROOT/dev"
mountpoint -q "$ARM64_ROOT/sys" || mount --bind /sys "$ARM64_ROOT/sys"
CPUINFO="$ARM64_ROOT/etc/collafuse-cpuinfo"
: > "$CPUINFO"
for i in $(seq 0 $(( $(nproc) - 1 ))); do
  cat >> "$CPUINFO" <<CPU
processor	: $i
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1

CPU
done
mountpoint -q "$ARM64_ROOT/proc/cpuinfo" || mount --bind "$CPUINFO" "$ARM64_ROOT/proc/cpuinfo"
cp /etc/ssl/certs/ca-certificates.crt "$ARM64_ROOT/etc/collafuse-host-ca.crt"
cp /etc/resolv.conf "$ARM64_ROOT/etc/resolv.conf" 2>/dev/null || true

# -- the package and tests, copied in fresh each run ---------------------------------------------
rm -rf "$ARM64_ROOT/opt/collafuse"
mkdir -p "$ARM64_ROOT/opt/collafuse"
tar -C "$REPO" --exclude='__pycache__' --exclude='*.egg-info' --exclude='build' -cf - edge_runtime tests/edge .ci/aarch64/parity.py \
  | tar -C "$ARM64_ROOT/opt/collafuse" -xf -

IN_CHROOT=(chroot "$ARM64_ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin
  QEMU_CPU="$QEMU_CPU" PIP_CONFIG_FILE=/dev/null PIP_CERT=/etc/collafuse-host-ca.crt
  PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_WAIT_POLICY=PASSIVE LANG=C.UTF-8)

[ "$("${IN_CHROOT[@]}" uname -m)" = aarch64 ] || die "the chroot does not run as aarch64"
if [ ! -x "$ARM64_ROOT/opt/venv/bin/python" ]; then
  say "creating the arm64 venv"
  "${IN_CHROOT[@]}" python3 -m venv /opt/venv
fi
say "installing collafuse-edge[cpu,png,sign] + pytest in the arm64 venv"
t0=$(date +%s)
"${IN_CHROOT[@]}" /opt/venv/bin/pip install -q "/opt/collafuse/edge_runtime[cpu,png,sign]" pytest pytest-aiohttp hypothesis
say "install took $(( $(date +%s) - t0 )) s"
"${IN_CHROOT[@]}" /opt/venv/bin/python -c 'import platform, sys, numpy, onnxruntime
print(f"arm64 userland: {platform.machine()} python {sys.version.split()[0]} numpy {numpy.__version__} onnxruntime {onnxruntime.__version__}")' \
  | tee "$OUT/versions.txt"
"${IN_CHROOT[@]}" /opt/venv/bin/pip freeze > "$OUT/pip-freeze.txt"

say "running tests/edge on arm64 (QEMU_CPU=$QEMU_CPU)"
t0=$(date +%s)
set +e
"${IN_CHROOT[@]}" sh -c 'cd /opt/collafuse/tests/edge && /opt/venv/bin/python -m pytest -q -p no:cacheprovider --rootdir=. -c /dev/null -o asyncio_mode=auto -o asyncio_default_fixture_loop_scope=function .' \
  2>&1 | tee "$OUT/pytest.log" | tail -15
rc=${PIPESTATUS[0]}
set -e
say "tests/edge on arm64: exit $rc in $(( $(date +%s) - t0 )) s"
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || exit "$rc"

say "parity: one bundle on arm64 vs this machine"
"${IN_CHROOT[@]}" /opt/venv/bin/python /opt/collafuse/.ci/aarch64/parity.py run \
  --bundle /opt/collafuse/tests/edge/fixtures/tiny_cond --out /opt/collafuse/parity-arm64.npz
cp "$ARM64_ROOT/opt/collafuse/parity-arm64.npz" "$OUT/parity-arm64.npz"
X86_PY=${X86_PY:-$REPO/.venv/bin/python}
[ -x "$X86_PY" ] || X86_PY=$PYTHON
PYTHONPATH="$REPO/edge_runtime" "$X86_PY" .ci/aarch64/parity.py run --bundle tests/edge/fixtures/tiny_cond --out "$OUT/parity-x86.npz"
"$X86_PY" .ci/aarch64/parity.py compare "$OUT/parity-arm64.npz" "$OUT/parity-x86.npz" --tol 1e-5 | tee "$OUT/parity.txt"
