#!/usr/bin/env bash
# make test-arm64: run the arm64-marked tests inside an emulated arm64 Debian (a Raspberry Pi 5's
# Cortex-A76), so the ARM paths (llama.cpp's NEON/dotprod kernels and Q4_0 repack, onnxruntime's
# aarch64 MatMulNBits, Pi detection) execute for real without a Pi. Proves correctness, never speed:
# emulated SIMD runs ~400x slower.
#
# Idempotent; everything lives under ~/.cache/edgeqwen/arm64 (EDGEQWEN_ARM64_CACHE):
#   rootfs/    Debian bookworm arm64 (debootstrap minbase + python3), made once
#   wheel      llama-cpp-python cross-compiled for the A76 by tools/install-llama-cpp.sh --target aarch64
#   venv       /opt/venv inside the rootfs, reinstalled when pyproject.toml or the wheel change
# Needs root (chroot, mounts); installs what it needs when missing (Debian: qemu-user-static, binfmt-support,
# debootstrap, gcc/g++-aarch64-linux-gnu, patchelf), mounts binfmt_misc and registers qemu's aarch64 entry.
#
# Usage: tools/test-arm64.sh [pytest args...]      (default: -m arm64 on the arm64 test files)
#        tools/test-arm64.sh --shell                (a shell inside, for poking around)
#        tools/test-arm64.sh --run CMD...           (one command inside, e.g. --run edgeqwen hw)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EDGEQWEN_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeqwen/arm64}
ROOT=$CACHE/rootfs
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CPU=${QEMU_CPU:-cortex-a76}
say() { echo "test-arm64: $*" >&2; }
die() { say "$*"; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (chroot and bind mounts)"
# What it runs with, installed when missing (Debian's packages; elsewhere, one line saying what to install).
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v patchelf >/dev/null || need+=(patchelf)
if (( ${#need[@]} )); then
  command -v apt-get >/dev/null || die "missing ${need[*]}: install them with this system's package manager"
  say "installing ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >"/tmp/edgeqwen-arm64-apt.log" 2>&1 \
    || die "apt-get install ${need[*]} failed (log: /tmp/edgeqwen-arm64-apt.log)"
fi
# The kernel runs aarch64 binaries through qemu by a binfmt_misc entry; a fresh container may not even have
# binfmt_misc mounted.
BINFMT=/proc/sys/fs/binfmt_misc
if [[ ! -e $BINFMT/status ]]; then
  mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null \
    || die "binfmt_misc is not mounted and cannot be here: mount -t binfmt_misc binfmt_misc $BINFMT"
fi
if [[ ! -e $BINFMT/qemu-aarch64 ]]; then
  update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
if [[ ! -e $BINFMT/qemu-aarch64 && -f /usr/lib/binfmt.d/qemu-aarch64.conf ]]; then   # systemd's format, by hand
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$BINFMT/register" 2>/dev/null || true
fi
[[ -e $BINFMT/qemu-aarch64 ]] || die "no binfmt entry for aarch64: update-binfmts --enable qemu-aarch64"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9   # one run at a time: they share the rootfs

# 1. The rootfs, made once (about 5 minutes; the second stage runs under emulation).
if [[ ! -f $ROOT/.edgeqwen-rootfs ]]; then
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
  say "creating a Debian $SUITE arm64 rootfs in $ROOT"
  rm -rf "$ROOT.tmp"
  # No libgomp1 on purpose: the cross-built wheel must carry its own, as it must on a bare Pi OS Lite.
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOT.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  touch "$ROOT.tmp/.edgeqwen-rootfs"
  rm -rf "$ROOT"; mv "$ROOT.tmp" "$ROOT"
fi

# 2. llama-cpp-python for the A76, cross-compiled on this machine (about 6 minutes, cached).
wheel=$("$REPO/tools/install-llama-cpp.sh" --target aarch64)
[[ -f $wheel ]] || die "no aarch64 wheel from install-llama-cpp.sh"

# 3. A Pi 5's identity: its /proc/cpuinfo (qemu would pass the host's x86 one through, and
#    onnxruntime's cpuinfo segfaults on it) and its device-tree model.
fake=$CACHE/pi5
mkdir -p "$fake/devicetree/base"
cp "$REPO/tools/arm64/pi5-cpuinfo" "$fake/cpuinfo"
printf 'Raspberry Pi 5 Model B Rev 1.0\0' > "$fake/devicetree/base/model"

# llama.cpp's Qwen2 tokenizer test vectors, from the sdist of the llama-cpp-python we build.
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
vocab=$CACHE/vocab-$version
if [[ ! -f $vocab/ggml-vocab-qwen2.gguf.out ]]; then
  rm -rf "$vocab.tmp" && mkdir -p "$vocab.tmp"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$vocab.tmp" "llama-cpp-python==$version" >&2
  tar -xzf "$vocab.tmp"/llama_cpp_python-*.tar.gz -C "$vocab.tmp" --wildcards '*/models/ggml-vocab-qwen2.gguf*'
  find "$vocab.tmp" -name 'ggml-vocab-qwen2.gguf*' -exec mv {} "$vocab.tmp/" \;
  rm -rf "$vocab.tmp"/llama_cpp_python-*; rm -rf "$vocab"; mv "$vocab.tmp" "$vocab"
fi

# The x86 side of the agreement: the tiny model's builds and their outputs, made here with the setup venv.
PY=${PYTHON:-$REPO/.venv/bin/python}
agree=$CACHE/agree
# Rebuilt when the code that makes or runs the builds changes (its content, committed or not).
astamp=$(cd "$REPO" && find edgeqwen -name '*.py' | LC_ALL=C sort | xargs cat tools/arm64/agreement.py tests/conftest.py \
         | sha256sum | cut -c1-16)
if [[ ! -f $agree/x86_64/int4.npz ]] || [[ $(cat "$agree/.stamp" 2>/dev/null) != "$astamp" ]]; then
  say "building the tiny model on x86 and recording its outputs"
  rm -rf "$agree"; mkdir -p "$agree"
  "$PY" "$REPO/tools/arm64/agreement.py" prepare "$agree" >&2
  echo "$astamp" > "$agree/.stamp"
fi
rm -rf "$agree/aarch64"

# The same CA bundle as the host's pip, and none of the host's PIP_* settings.
cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
[[ -f ${cert:-} ]] || cert=/etc/ssl/certs/ca-certificates.crt
cp "$cert" "$ROOT/etc/edgeqwen-pip-ca.crt"
printf '[global]\ncert = /etc/edgeqwen-pip-ca.crt\ndisable-pip-version-check = true\n' > "$ROOT/etc/pip.conf"

# The source tree, copied (the rootfs's pip writes egg-info beside it).
mkdir -p "$ROOT/opt/edgeqwen"
tar -C "$REPO" --exclude=.venv --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$ROOT/opt/edgeqwen" -xf -
mkdir -p "$ROOT/opt/shared"
mkdir -p "$ROOT/opt/wheel" && rm -f "$ROOT"/opt/wheel/*.whl && cp "$wheel" "$ROOT/opt/wheel/"

inside() {  # run a command in the rootfs, in a private mount namespace so nothing outlives it
  local shared_mount=""
  [[ -d $REPO/../shared ]] && shared_mount="mount --bind -o ro '$(cd "$REPO/.." && pwd)/shared' '$ROOT/opt/shared';"
  unshare --mount --propagation private bash -c "
    set -e
    mount -t proc proc '$ROOT/proc'
    mount --bind '$fake/cpuinfo' '$ROOT/proc/cpuinfo'
    mount -t sysfs sys '$ROOT/sys'
    mount -t tmpfs tmpfs '$ROOT/sys/firmware'
    mkdir -p '$ROOT/sys/firmware/devicetree'
    mount --bind '$fake/devicetree' '$ROOT/sys/firmware/devicetree'
    mount --bind /dev '$ROOT/dev'
    mount -t devpts devpts '$ROOT/dev/pts' -o newinstance,ptmxmode=0666 2>/dev/null || mount --bind /dev/pts '$ROOT/dev/pts'
    mount -t tmpfs tmpfs '$ROOT/tmp'
    mkdir -p '$ROOT/opt/agree' '$ROOT/opt/vocab'
    mount --bind '$agree' '$ROOT/opt/agree'
    mount --bind -o ro '$vocab' '$ROOT/opt/vocab'
    $shared_mount
    exec chroot '$ROOT' /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8 \
      QEMU_CPU='$CPU' TERM=dumb PYTHONDONTWRITEBYTECODE=1 \"\$@\"" inside "$@"
}

# 4. The venv: the wheel, then edgeqwen with its GGUF and ONNX extras and what the tests use.
# Reinstalled when the dependencies or the wheel change (edgeqwen itself is an editable install of the copy).
stamp=$( (sed -n '/^dependencies/,/^\[project.scripts\]/p' "$REPO/pyproject.toml"; cat "$wheel") | sha256sum | cut -c1-16)
if [[ ! -f $ROOT/opt/venv/.stamp ]] || [[ $(cat "$ROOT/opt/venv/.stamp") != "$stamp" ]]; then
  say "installing edgeqwen into the rootfs (pip under emulation: several minutes)"
  inside /bin/sh -c "rm -rf /opt/venv && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -q /opt/wheel/*.whl \
    && /opt/venv/bin/pip install -q -e '/opt/edgeqwen[gguf,onnx]' pytest pexpect hypothesis tokenizers"
  echo "$stamp" > "$ROOT/opt/venv/.stamp"
fi

case "${1:-}" in
  --shell) inside /bin/bash ;;
  --run) shift; inside "$@" ;;
  *)
    say "running the arm64 tests under qemu ($CPU)"
    args=("$@")
    (( ${#args[@]} )) || args=(-m arm64 tests/test_arm64.py)
    t0=$(date +%s)
    inside /bin/sh -c "cd /opt/edgeqwen && EDGEQWEN_EMULATED='qemu-user ($CPU)' EDGEQWEN_EMULATED_RAM_GIB=8 EDGEQWEN_AGREE_DIR=/opt/agree \
      EDGEQWEN_VOCAB_DIR=/opt/vocab python -m pytest -p no:cacheprovider -q $(printf '%q ' "${args[@]}")"
    say "arm64 tests passed in $(( $(date +%s) - t0 )) s"
    if [[ -f $agree/aarch64/results.json ]]; then
      head=$CACHE/agree/head.md
      { echo "# x86 against arm64 (emulated Cortex-A76): the same tiny builds"
        echo
        echo "Generated by \`make test-arm64\` ($(date -u +%Y-%m-%d); host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs);"
        echo "guest: Debian $SUITE arm64 under $(qemu-aarch64-static --version | head -1), QEMU_CPU=$CPU; llama.cpp cross-built"
        echo "with $(bash "$REPO/tools/install-llama-cpp.sh" --target aarch64 --print-flags | grep -o 'GGML_CPU_ARM_ARCH=[^ ]*')). The tiny random Qwen2"
        echo "(2 layers, hidden 256, real vocabulary) is built once on x86; both machines run the same files. Greedy"
        echo "tokens: $((24)) from one prompt. Logits: teacher-forced on one fixed sequence (the prompt and x86's f16"
        echo "reply), KL(x86 || arm64) per position. Correctness only: emulation says nothing about speed."
        echo; } > "$head"
      "$PY" "$REPO/tools/arm64/agreement.py" compare "$agree" --out "$CACHE/ARM64.md" "$head" >/dev/null
      [[ -n ${EDGEQWEN_ARM64_TABLE:-} ]] && cp "$CACHE/ARM64.md" "$EDGEQWEN_ARM64_TABLE"
      cat "$CACHE/ARM64.md"
    fi
    ;;
esac
