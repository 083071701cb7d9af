#!/usr/bin/env bash
# An emulated arm64 board: a Debian bookworm arm64 root run under qemu-user, with the aarch64 wheels of
# the very numpy, numba, onnx and onnxruntime versions installed on this host. Timings under emulation
# mean nothing; bits do: `check` profiles the shipped LeNet-5 on it against this host and requires the
# weight digests to agree (fp32 in deterministic mode, and static 8/8), and a CIFAR ResNet-8 at 8/8 on the
# fused tiles' Arm `sdot` form (BatchNorm and residual joins on tensors large enough for their parallel
# kernels), the board emulating a Raspberry Pi 5's Cortex-A76 (ARM64_BOARD_CPU).
#
#   tools/arm64_board.sh setup           build the root once (needs root, qemu-user-static, debootstrap)
#   tools/arm64_board.sh python ARGS...  run the board's python3 on ARGS (this checkout importable)
#   tools/arm64_board.sh check           profile LeNet-5 (fp32, 8/8) and ResNet-8 (8/8) on the board; exit 1 if digests differ
#
# The root lives in $ARM64_ROOT (default .arm64-board/ in the checkout). Only Debian's packages and the
# package registry are used: debootstrap's first stage fetches and unpacks the packages (no maintainer
# script runs, so no package is configured under emulation, which took 12 min against 1 min), and the
# wheels are unpacked straight into /opt/site (pip itself never runs emulated).
# `python` runs in a private mount namespace: /proc, /dev, /tmp and this checkout are bound into the
# root at the same paths (so the host's ptys and temporary folders are the board's), and the mounts
# vanish with the process. /sys is not: onnxruntime's cpuinfo, reading the x86 host's CPU topology there
# under emulation, crashes the process on import (without it, it warns and runs, and its integer GEMM
# passes the exactness probe, so the board exercises the onnxruntime route too).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${ARM64_ROOT:-$HERE/.arm64-board}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY=python3.11   # bookworm's Python: the wheels must match its ABI (cp311)
SITE=/opt/site

die() { echo "arm64_board: error: $*" >&2; exit 2; }

need_root() { [ "$(id -u)" -eq 0 ] || die "needs root (chroot, mounts and binfmt_misc); run it with sudo"; }

pinned_dependencies() {  # pyproject's runtime dependencies (and llvmlite, numba's) at the host's versions
    "${HOST_PYTHON:-python3}" -c 'import importlib.metadata as m, re, sys, tomllib
names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0)
         for r in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]] + ["llvmlite"]
print(" ".join(f"{name}=={m.version(name)}" for name in names))' "$HERE/pyproject.toml"
}

register_qemu() {
    command -v qemu-aarch64-static >/dev/null || { apt-get install -y -q qemu-user-static binfmt-support >/dev/null \
        || die "qemu-user-static is not installed and apt-get could not install it"; }
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || die "cannot mount binfmt_misc: this kernel or container cannot run foreign binaries"
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64 2>/dev/null || true
    fi
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "qemu-aarch64 is not registered with binfmt_misc"
}

setup() {
    need_root
    register_qemu
    command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null || die "no debootstrap"
    if [ ! -x "$ROOT/usr/bin/$PY" ]; then
        echo "arm64_board: fetching Debian $SUITE arm64 into $ROOT" >&2
        rm -rf "$ROOT"
        debootstrap --foreign --arch=arm64 --variant=minbase --include=python3-minimal,libpython3.11-stdlib \
            "$SUITE" "$ROOT" "$MIRROR" >"$HERE/.arm64-board.log" 2>&1 || die "debootstrap failed (see .arm64-board.log)"
        for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
        rm -f "$ROOT"/var/cache/apt/archives/*.deb
    fi
    local stamp="$ROOT$SITE/.versions" want
    want="$(pinned_dependencies)" || die "cannot read the host's dependency versions"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "arm64_board: aarch64 wheels: $want" >&2
        local tmp
        tmp="$(mktemp -d)"
        # shellcheck disable=SC2086
        "${HOST_PYTHON:-python3}" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
            --abi cp311 --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 -d "$tmp" $want \
            || die "pip could not download the aarch64 wheels"
        rm -rf "$ROOT$SITE"
        mkdir -p "$ROOT$SITE"
        for wheel in "$tmp"/*.whl; do "${HOST_PYTHON:-python3}" -m zipfile -e "$wheel" "$ROOT$SITE/"; done
        rm -rf "$tmp"
        echo "$want" >"$stamp"
    fi
    mkdir -p "$ROOT/var/cache/numba"
    echo "arm64_board: ready: $ROOT" >&2
}

run_python() {
    need_root
    # ARM64_BOARD_CPU=cortex-a76 (say): the board is that CPU to Numba, which under qemu-user otherwise sees a
    # generic Armv8 (the host's /proc/cpuinfo is x86's). ARM64_BOARD_SDOT=1: its integer route is the tiles in
    # their `sdot` form (vnni.ISA_ENV; `auto` leaves that form to be asked for; the CPU must have dot products).
    # Only the board's process gets these: on the x86 host they would make LLVM emit Arm instructions.
    export BOARD_CPU_ENV=""
    if [ -n "${ARM64_BOARD_CPU:-}" ]; then
        BOARD_CPU_ENV="NUMBA_CPU_NAME=$ARM64_BOARD_CPU"
    fi
    if [ -n "${ARM64_BOARD_SDOT:-}" ]; then
        BOARD_CPU_ENV="$BOARD_CPU_ENV EDGETRAIN_TILE_ISA=sdot EDGETRAIN_BACKEND=vnni"
    fi
    [ -x "$ROOT/usr/bin/$PY" ] || die "no board root at $ROOT; run: tools/arm64_board.sh setup"
    register_qemu
    # Bind what the host shares with the board at the same paths, in a mount namespace of our own.
    exec unshare --mount --propagation private /bin/bash -c '
        set -e
        root="$1"; shift
        for dir in /proc /dev /tmp "$HERE_DIR"; do
            mkdir -p "$root$dir"
            mount --rbind "$dir" "$root$dir"
        done
        cwd="$PWD"
        [ -d "$root$cwd" ] || cwd="$HERE_DIR"
        exec chroot "$root" /usr/bin/env -C "$cwd" PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/opt/site" \
            NUMBA_CACHE_DIR=/var/cache/numba PATH=/usr/bin:/bin $BOARD_CPU_ENV "$@"
    ' arm64_board "$ROOT" "/usr/bin/$PY" "$@"
}

run_python_sub() { (run_python "$@"); }  # run_python execs: keep this shell

profile_run() {  # OUT "name|precision|model|sdot": profile on the board; fail unless the digests agree
    local out="$1" name precision path sdot started=$SECONDS
    IFS='|' read -r name precision path sdot <<<"$2"
    local tag="$name-${precision//\//x}"
    echo "arm64_board: profile $name batch 8, 2 steps, $precision, on the emulated board${sdot:+ (sdot tiles)}" >&2
    ARM64_BOARD_SDOT="$sdot" "${HOST_PYTHON:-python3}" -m edgetrain.cli profile "$path" --simulate \
        --sim-python "$HERE/tools/arm64_board.sh python" --sim-cache "$out/cache-$tag" \
        --precision "$precision" --batch-size 8 --steps 2 --warmup 0 --timeout 1500 \
        --out "$out/$tag" --json >"$out/$tag.json" || return 1
    "${HOST_PYTHON:-python3}" - "$out/$tag.json" "$name $precision" "$((SECONDS - started))" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
digest = report["digest"]
routes = {side: (report[side].get("engine") or {}).get("integer_route", "?") for side in ("board", "host")}
print(f"arm64_board: {sys.argv[2]}: host {digest['host']} board {digest['board']} "
      f"({'agree' if digest['agree'] else 'DIFFER'}; float {digest['float_mode']}; integer route: board "
      f"{routes['board']}, host {routes['host']}) in {sys.argv[3]} s")
sys.exit(0 if digest["agree"] else 1)
EOF
}

check() {
    local model="$HERE/edgetrain/assets/lenet5_digits.onnx" out status=0
    out="$(mktemp -d)"
    # The board is a Raspberry Pi 5's CPU, a Cortex-A76, in every run: one CPU, so the two lanes below share
    # what Numba compiles for it (a second CPU compiled everything twice: 23.5 min against the stage's 20).
    export ARM64_BOARD_CPU="${ARM64_BOARD_CPU:-cortex-a76}"
    # A CIFAR ResNet-8 too (32x32, batch 8): BatchNorm's lane sums and the fused residual joins run on tensors
    # large enough for their parallel builds, which LeNet-5 (no BatchNorm, no join) never reaches.
    "${HOST_PYTHON:-python3}" -c "import sys, models; open(sys.argv[1], 'wb').write(
    models.build_model('resnet8', num_classes=10, seed=0).SerializeToString())" "$out/resnet8.onnx" \
        || die "cannot build the ResNet-8 model"
    # Fail fast on a board that cannot even start the agent (the host would wait out --timeout), and
    # probe the board's integer routes once, outside any timed handshake.
    local started=$SECONDS
    run_python_sub -c "import firmware_bridge.board.agent
from edgetrain.kernels import routes
print('arm64_board: board imports the agent; routes:', routes.describe())" || die "the board cannot start the agent"
    echo "arm64_board: board ready in $((SECONDS - started)) s" >&2
    # Two lanes side by side (most of each run is Numba compiling under emulation, one core apiece): LeNet-5 on
    # the route `auto` takes there (onnxruntime at 8/8), and ResNet-8 with its convs and GEMMs on the tiles'
    # `sdot` form, whose integers must be the host's (AVX-512 VNNI, AVX2 or another route) to the bit.
    local lane1 lane2
    (lane=0; profile_run "$out" "LeNet-5|fp32|$model|" || lane=1
     profile_run "$out" "LeNet-5|8/8|$model|" || lane=1; exit "$lane") &
    lane1=$!
    profile_run "$out" "ResNet-8|8/8|$out/resnet8.onnx|1" &
    lane2=$!
    wait "$lane1" || status=1
    wait "$lane2" || status=1
    rm -rf "$out"
    return "$status"
}

export HERE_DIR="$HERE"
case "${1:-}" in
    setup) setup ;;
    python) shift; run_python "$@" ;;
    check) check ;;
    *) echo "usage: tools/arm64_board.sh setup|python ARGS...|check" >&2; exit 2 ;;
esac
