#!/usr/bin/env bash
# arm64 proof: run the runtime's kernel and model tests under an emulated arm64 (aarch64) Linux.
#
# An arm64 Debian root is made with debootstrap and entered with chroot; its binaries run through
# qemu-user (qemu-aarch64-static registered with binfmt_misc, flag F) -- no system emulation, no VM.
# Inside, a venv gets numpy/numba/llvmlite, torch, transformers, peft... (aarch64 wheels, the
# package index) and edgelora itself, installed from a copy of this repository; then pytest runs
# the chosen test files from outside the source tree, so the installed package is what is tested.
#
# Usage (as root; not part of the test suite, CI does not run it):
#   scripts/arm64_proof.sh                    # default test files, see ARM64_TESTS
#   scripts/arm64_proof.sh tests/test_kernels.py -k f16     # other files / pytest arguments
#   scripts/arm64_proof.sh --setup-only       # make (or refresh) the root and venv, run nothing
#   scripts/arm64_proof.sh --rebuild          # throw the cached root away first
#
# Environment (all optional):
#   ARM64_ROOT        the arm64 root, a cache outside the repository
#                     (default: $HOME/.cache/edgelora/arm64-root; multi-GB)
#   ARM64_RELEASE     Debian release for debootstrap (default: bookworm, Python 3.11)
#   ARM64_MIRROR      Debian mirror for debootstrap (default: debootstrap's own default)
#   ARM64_TORCH       torch version inside (default: 2.10.0 -- see TORCH note below)
#   ARM64_TESTS       test files when no arguments are given (default: tests/test_kernels.py
#                     tests/test_runtime.py tests/test_lora.py -- the runtime's kernels, the models
#                     against transformers, the LoRA adapters against PEFT)
#   ARM64_NUMBA_CPU   NUMBA_CPU_NAME inside (default: generic; "host" leaves it unset)
#   ARM64_QEMU_CPU    the CPU qemu-user emulates (QEMU_CPU inside; default: max, which has dotprod and
#                     i8mm, so every int8 kernel variant runs; e.g. cortex-a53 for a CPU without them)
#   ARM64_NICE        nice level of the heavy steps (default: 10)
#   ARM64_RESULT      result file (default: bench/results/arm64.json in this repository)
#   EDGELORA_SHARED_MODELS   folder holding stories260K (default: ../shared/models beside the repo);
#                     copied into the root when present, so the real-small-model test runs too
#
# TORCH: the package index's aarch64 torch wheels of 2.11 and later are CUDA builds that pull
# several GB of CUDA packages (cuda-toolkit, cudnn, nccl ... required on Linux whatever the CPU);
# 2.10.0 is the newest whose aarch64 wheel is a CPU build, so it is the default here (the x86-64
# suite uses 2.13.0). ARM64_TORCH=2.13.0 should install too, with those GB (not tried here).
#
# NUMBA: under qemu-user LLVM's host-CPU detection finds no real arm64 CPU (it reports "generic"
# here; what /proc/cpuinfo shows depends on the qemu version), so NUMBA_CPU_NAME=generic pins
# Numba to baseline ARMv8-A (what any arm64 CPU and qemu's default CPU run) whatever qemu shows.
# runtime/simd.py still asks LLVM for the host features: on aarch64 they never contain
# avx2/avx512f, so SIMD is None and the portable kernels are used; the summary prints what the
# emulated process reported.
#
# tests/test_nf4_codec.py (the converter against bitsandbytes, bit for bit; bitsandbytes 0.50.2 has
# an aarch64 wheel) compares with the torch it runs beside: aarch64 torch (NEON) sums float32 in
# 4 lanes where x86-64 sums in 8, which moves the double-quant offset by an ulp; the tests pass the
# lane count of that torch (converters/nf4.py's sum_lanes; the first run of this script found it).
#
# Exit status: pytest's (non-zero when a test fails), or non-zero when a setup step fails.
# Writes bench/results/arm64.json atomically (a temporary file, then a rename).
set -euo pipefail

START=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${ARM64_ROOT:-$HOME/.cache/edgelora/arm64-root}"
RELEASE="${ARM64_RELEASE:-bookworm}"
TORCH_VERSION="${ARM64_TORCH:-2.10.0}"
NUMBA_CPU="${ARM64_NUMBA_CPU:-generic}"
QEMU_CPU_MODEL="${ARM64_QEMU_CPU:-max}"
NICE="${ARM64_NICE:-10}"
RESULT="${ARM64_RESULT:-$REPO/bench/results/arm64.json}"
SHARED_MODELS="${EDGELORA_SHARED_MODELS:-$REPO/../shared/models}"
DEFAULT_TESTS="tests/test_kernels.py tests/test_runtime.py tests/test_lora.py tests/test_nf4_codec.py"
TESTS="${ARM64_TESTS:-$DEFAULT_TESTS}"

# Pinned to what the x86-64 suite uses (torch aside, see above). bitsandbytes is optional
# (only tests/test_nf4_codec.py uses it, and skips itself when it does not import).
PIP_SPECS=(
  "setuptools>=64" wheel
  numpy==2.4.6 numba==0.68.1 llvmlite==0.50.0 safetensors==0.8.0 tokenizers==0.23.3 onnx==1.23.2
  jinja2==3.1.6 tqdm==4.70.1 threadpoolctl==3.8.0 pytest==9.0.3 hypothesis==6.155.2
  "torch==$TORCH_VERSION" transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 psutil==7.2.2
)
OPTIONAL_SPECS=(bitsandbytes==0.50.2)

SETUP_ONLY=0
REBUILD=0
PYTEST_ARGS=()
for a in "$@"; do
  case "$a" in
    --setup-only) SETUP_ONLY=1 ;;
    --rebuild) REBUILD=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) PYTEST_ARGS+=("$a") ;;
  esac
done

log() { printf '[arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount)"
case "$ROOT" in "$REPO"|"$REPO"/*) die "ARM64_ROOT must be outside the repository" ;; esac
case "$ROOT" in /|"") die "refusing ARM64_ROOT=$ROOT" ;; esac

# ---------------------------------------------------------------- host tools
need_pkgs=()
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || need_pkgs+=(qemu-user-static)
command -v update-binfmts >/dev/null || need_pkgs+=(binfmt-support)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
QEMU_VERSION="$(qemu-aarch64-static --version | head -1)"

# binfmt_misc: aarch64 ELF files run through qemu; flag F (the interpreter opened at
# registration) lets them run inside the chroot without a copy of qemu there.
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
  log "mounting binfmt_misc"
  mount -t binfmt_misc binfmt_misc "$BINFMT"
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  log "registering qemu-aarch64 with binfmt_misc"
  update-binfmts --enable qemu-aarch64 2>/dev/null || true
  if [ ! -e "$BINFMT/qemu-aarch64" ] && [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$BINFMT/register"
  fi
fi
[ -e "$BINFMT/qemu-aarch64" ] || die "qemu-aarch64 is not registered with binfmt_misc"
grep -q '^enabled' "$BINFMT/qemu-aarch64" || echo 1 > "$BINFMT/qemu-aarch64"
INTERP="$(sed -n 's/^interpreter //p' "$BINFMT/qemu-aarch64")"
if ! grep -q '^flags:.*F' "$BINFMT/qemu-aarch64"; then
  log "binfmt entry has no F flag: the interpreter is copied into the root"
  COPY_INTERP=1
else
  COPY_INTERP=0
fi

# ---------------------------------------------------------------- lock, mounts, cleanup
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -n 9 || die "another arm64_proof run holds $ROOT.lock"

MOUNTED=()
cleanup() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" 2>/dev/null || true
  done
  MOUNTED=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mounts_under() { awk -v r="$1" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/mounts; }
safe_remove() {  # rm -rf a root only when nothing is mounted inside it
  local m
  m="$(mounts_under "$1")"
  [ -z "$m" ] || die "still mounted under $1: $m"
  rm -rf --one-file-system "$1"
}

mount_root() {
  local d
  for d in proc sys dev dev/pts; do mkdir -p "$ROOT/$d"; done
  mount -t proc proc "$ROOT/proc"; MOUNTED+=("$ROOT/proc")
  mount --bind /sys "$ROOT/sys"; MOUNTED+=("$ROOT/sys")
  mount --bind /dev "$ROOT/dev"; MOUNTED+=("$ROOT/dev")
  mount --bind /dev/pts "$ROOT/dev/pts"; MOUNTED+=("$ROOT/dev/pts")
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
  # the host's CA bundle (it may hold a local proxy's CA that the root's ca-certificates lacks)
  [ -f "$HOST_CA" ] && cp -L "$HOST_CA" "$ROOT/etc/ssl/certs/host-ca-bundle.crt"
  if [ "$COPY_INTERP" = 1 ]; then
    mkdir -p "$ROOT$(dirname "$INTERP")"
    cp -L "$INTERP" "$ROOT$INTERP"
  fi
}

# Commands inside the root: a clean environment (the host's pip settings, OPENBLAS_CORETYPE ...
# mean nothing there).
IN_ENV=(/usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180)
HOST_CA="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
[ -f "$HOST_CA" ] && IN_ENV+=(PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt)
[ "$NUMBA_CPU" = host ] || IN_ENV+=(NUMBA_CPU_NAME="$NUMBA_CPU")
IN_ENV+=(QEMU_CPU="$QEMU_CPU_MODEL")
inside() { nice -n "$NICE" chroot "$ROOT" "${IN_ENV[@]}" "$@"; }

STATE="$ROOT/.edgelora"

# ---------------------------------------------------------------- 1. the Debian root
if [ "$REBUILD" = 1 ] && [ -d "$ROOT" ]; then
  log "--rebuild: removing $ROOT"
  safe_remove "$ROOT"
fi
if [ ! -f "$STATE/debootstrap.ok" ]; then
  [ -d "$ROOT" ] && { log "removing an unfinished root at $ROOT"; safe_remove "$ROOT"; }
  log "debootstrap --arch=arm64 $RELEASE into $ROOT (slow: the second stage runs emulated)"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  nice -n "$NICE" debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,ca-certificates,libgomp1 \
    "$RELEASE" "$ROOT" ${ARM64_MIRROR:-} >"$ROOT.debootstrap.log" 2>&1 \
    || { tail -30 "$ROOT.debootstrap.log" >&2; die "debootstrap failed (log: $ROOT.debootstrap.log)"; }
  mkdir -p "$STATE"
  echo "$RELEASE $(date -u +%FT%TZ) $(( $(date +%s) - t0 ))s" > "$STATE/debootstrap.ok"
  log "debootstrap done in $(( $(date +%s) - t0 ))s"
else
  log "cached root: $ROOT ($(cut -d' ' -f1-2 "$STATE/debootstrap.ok"))"
fi

mount_root

# ---------------------------------------------------------------- 2. the venv and the wheels
specs_hash="$(printf '%s\n' "${PIP_SPECS[@]}" "${OPTIONAL_SPECS[@]}" | sha256sum | cut -c1-16)"
# The wheels are fetched by the host's pip (native speed; an emulated pip's TLS connections were
# reset by the index under load) for the root's Python (cp311, glibc 2.36, aarch64) into a cache
# beside the root, then installed inside with --no-index from a copy of that folder. The host's
# pip configuration (constraints, extra indexes for x86-64) is left out: PIP_CONFIG_FILE=/dev/null.
# `pip download --platform` evaluates dependency markers for the host (x86-64: torch would pull
# CUDA packages), so the dependencies are listed here instead, each with --no-deps: the closure of
# the pinned packages' requirements with aarch64 Linux markers, at the versions the host's Python
# environment (the x86-64 test environment) has installed.
closure() {
  python3 - "$@" <<'PY'
import sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
env = {"platform_machine": "aarch64", "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
       "python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
pins = {canonicalize_name(Requirement(s).name): s for s in sys.argv[1:]}
todo, seen = [Requirement(s).name for s in sys.argv[1:]], set()
while todo:
    name = todo.pop()
    if canonicalize_name(name) in seen:
        continue
    seen.add(canonicalize_name(name))
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    pins.setdefault(canonicalize_name(name), f"{dist.metadata['Name']}=={dist.version}")
    todo += [r.name for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate(env)]
print("\n".join(sorted(pins.values())))
PY
}
WHEELS="$ROOT.wheels"
WHEELS_IN=/opt/wheels-aarch64
host_download() {  # host_download SPEC...: aarch64 wheels of SPEC and its dependencies into $WHEELS
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" python3 -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_36_aarch64 --platform manylinux_2_35_aarch64 --platform manylinux_2_34_aarch64 \
    --platform manylinux_2_31_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
    --platform manylinux_2_24_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 --platform linux_aarch64 --platform any -d "$WHEELS" "$@" >&2
}
if [ ! -f "$STATE/venv-$specs_hash.ok" ]; then
  log "venv: fetching ${#PIP_SPECS[@]} pinned packages as aarch64 wheels on the host (torch==$TORCH_VERSION)"
  t0=$(date +%s)
  rm -f "$STATE"/venv-*.ok
  mkdir -p "$WHEELS"
  mapfile -t ALL_SPECS < <(closure "${PIP_SPECS[@]}")
  host_download pip "${ALL_SPECS[@]}" || die "downloading the aarch64 wheels failed (host pip)"
  OPTIONAL_OK=()
  for spec in "${OPTIONAL_SPECS[@]}"; do
    if host_download "$spec"; then OPTIONAL_OK+=("$spec")
    else log "optional $spec has no aarch64 wheel: the tests that need it skip"; fi
  done
  rm -rf "$ROOT$WHEELS_IN"; mkdir -p "$ROOT$WHEELS_IN"; cp "$WHEELS"/*.whl "$ROOT$WHEELS_IN"/
  log "venv: installing them inside the root"
  [ -x "$ROOT/opt/venv/bin/python" ] || inside /usr/bin/python3 -m venv /opt/venv
  local_pip=(/opt/venv/bin/python -m pip install -q --no-index --find-links "$WHEELS_IN")
  inside "${local_pip[@]}" --upgrade pip >&2
  inside "${local_pip[@]}" "${ALL_SPECS[@]}" "${OPTIONAL_OK[@]}" >&2 || die "pip install failed inside the arm64 root"
  rm -rf "$ROOT$WHEELS_IN"
  echo "$(date -u +%FT%TZ) $(( $(date +%s) - t0 ))s" > "$STATE/venv-$specs_hash.ok"
  log "venv done in $(( $(date +%s) - t0 ))s"
else
  log "cached venv ($specs_hash)"
fi

# ---------------------------------------------------------------- 3. edgelora from this repository
# A copy of the working tree (tracked and untracked-but-not-ignored files), not a bind mount, so that
# nothing aarch64 (Numba caches, build folders) lands in the repository.
SRC_IN=/opt/edgelora-src
# (bench/results/ and this script are left out: nothing installed reads them)
mapfile -d '' FILES < <(git -C "$REPO" ls-files -z --cached --others --exclude-standard -- . ':!bench/results' \
                        ':!scripts/arm64_proof.*')
src_hash="$( (cd "$REPO" && for f in "${FILES[@]}"; do [ -f "$f" ] && printf '%s\0' "$f"; done \
              | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)"
if [ ! -f "$STATE/src-$src_hash.ok" ]; then
  log "installing edgelora from the working tree ($src_hash) into the root"
  rm -f "$STATE"/src-*.ok
  rm -rf "$ROOT$SRC_IN"
  mkdir -p "$ROOT$SRC_IN"
  (cd "$REPO" && for f in "${FILES[@]}"; do [ -f "$f" ] && printf '%s\0' "$f"; done) \
    | (cd "$REPO" && tar --null -T - -cf -) | tar -C "$ROOT$SRC_IN" -xf -
  inside /opt/venv/bin/python -m pip install -q --no-deps --no-build-isolation --force-reinstall "$SRC_IN" >&2 \
    || die "installing edgelora inside the arm64 root failed"
  touch "$STATE/src-$src_hash.ok"
else
  log "cached edgelora install ($src_hash)"
fi

SHARED_IN=""
if [ -f "$SHARED_MODELS/stories260K/model.safetensors" ]; then
  mkdir -p "$ROOT/opt/shared-models"
  rm -rf "$ROOT/opt/shared-models/stories260K"
  cp -r "$SHARED_MODELS/stories260K" "$ROOT/opt/shared-models/"
  SHARED_IN=/opt/shared-models
  IN_ENV+=(EDGELORA_SHARED_MODELS="$SHARED_IN")
else
  log "no stories260K at $SHARED_MODELS: test_real_small_model_matches_transformers will skip"
fi

# ---------------------------------------------------------------- 4. what the emulated Python is
cat > "$ROOT/tmp/arm64_info.py" <<'PY'
import importlib, json, os, platform, sys
info = {"machine": platform.machine(), "python": platform.python_version(),
        "numba_cpu_name_env": os.environ.get("NUMBA_CPU_NAME")}
for mod in ("numpy", "numba", "llvmlite", "torch", "transformers", "peft", "bitsandbytes", "onnx", "tokenizers",
            "safetensors", "hypothesis", "pytest", "edgelora"):
    try:
        m = importlib.import_module(mod)
        info[mod] = getattr(m, "__version__", None) or "installed"
    except Exception as e:  # noqa: BLE001 -- reported, not fatal
        info[mod] = None
        info[mod + "_error"] = f"{type(e).__name__}: {e}"[:300]
import llvmlite.binding as llvm
info["llvm_host_cpu"] = llvm.get_host_cpu_name()
try:
    feats = llvm.get_host_cpu_features()
    info["llvm_host_features_x86_simd"] = sorted(k for k in ("avx2", "avx512f", "fma") if feats.get(k))
except Exception as e:  # noqa: BLE001
    info["llvm_host_features_x86_simd"] = f"unavailable: {e}"
from numba.core import config
info["numba_target_cpu"] = config.CPU_NAME or llvm.get_host_cpu_name()
info["numba_threads"] = config.NUMBA_NUM_THREADS
from edgelora.runtime import kernels, simd
info["simd"] = simd.SIMD
info["nf4_dot_variants"] = sorted(kernels.NF4_DOT_VARIANTS)
info["nf4_dot_selected"] = kernels._nf4_dot_aligned.py_func.__name__
info["qemu_cpu"] = os.environ.get("QEMU_CPU")
info["cpu_extensions"] = sorted(simd.AARCH64_EXTENSIONS)
from edgelora.runtime import int8
info["int8_variants"] = sorted(int8.INT8_VARIANTS)
info["int8_selected"] = simd.INT8_SIMD
info["edgelora_file"] = kernels.__file__
json.dump(info, sys.stdout)
PY
log "probing the emulated Python"
INFO_JSON="$(inside /opt/venv/bin/python /tmp/arm64_info.py)" || die "the probe failed inside the root"
UNAME_M="$(inside uname -m)"
DEBIAN_VERSION="$RELEASE $(cat "$ROOT/etc/debian_version")"
log "uname -m: $UNAME_M; $INFO_JSON"

if [ "$SETUP_ONLY" = 1 ]; then
  log "--setup-only: root ready in $(( $(date +%s) - START ))s"
  exit 0
fi

# ---------------------------------------------------------------- 5. the tests
if [ ${#PYTEST_ARGS[@]} -eq 0 ]; then
  read -r -a PYTEST_ARGS <<< "$TESTS"
fi
ARGS_IN=()
for a in "${PYTEST_ARGS[@]}"; do
  case "$a" in tests/*|./tests/*) ARGS_IN+=("$SRC_IN/${a#./}") ;; *) ARGS_IN+=("$a") ;; esac
done
RUN_DIR=/tmp/arm64-run
rm -rf "$ROOT$RUN_DIR"; mkdir -p "$ROOT$RUN_DIR"
PYTEST_CMD=(python -m pytest -q -p no:cacheprovider --junitxml="$RUN_DIR/junit.xml" "${ARGS_IN[@]}")
LOG="$ROOT$RUN_DIR/pytest.log"
log "running (cd $RUN_DIR; ${PYTEST_CMD[*]}) -- log: $LOG"
T_TESTS=$(date +%s)
set +e
inside /bin/sh -c 'cd "$0" && exec "$@"' "$RUN_DIR" "${PYTEST_CMD[@]}" 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
set -e
TEST_SECONDS=$(( $(date +%s) - T_TESTS ))
SUMMARY_LINE="$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$LOG" | tail -1 | sed -e 's/^=* *//' -e 's/ *=*$//')"
cleanup

# ---------------------------------------------------------------- 6. the result file and the summary
ELAPSED=$(( $(date +%s) - START ))
mkdir -p "$(dirname "$RESULT")"
export RESULT QEMU_VERSION DEBIAN_VERSION INFO_JSON UNAME_M RC ELAPSED TEST_SECONDS SUMMARY_LINE INTERP
export JUNIT="$ROOT$RUN_DIR/junit.xml" PYTEST_CMD_STR="cd $RUN_DIR && ${PYTEST_CMD[*]}"
python3 - <<'PY'
import json, os, platform, socket, tempfile, time
import xml.etree.ElementTree as ET
env = os.environ
info = json.loads(env["INFO_JSON"])
counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0}
failed = []
try:
    root = ET.parse(env["JUNIT"]).getroot()
    for case in root.iter("testcase"):
        counts["total"] += 1
        name = f'{case.get("classname")}::{case.get("name")}'
        if case.find("failure") is not None:
            counts["failed"] += 1; failed.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1; failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
except (OSError, ET.ParseError) as e:
    counts["junit_error"] = str(e)
result = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "host": {"machine": platform.machine(), "hostname": socket.gethostname(), "cpus": os.cpu_count(),
             "kernel": platform.release()},
    "qemu": env["QEMU_VERSION"], "binfmt_interpreter": env["INTERP"],
    "debian_release": env["DEBIAN_VERSION"],
    "emulated": {"uname_m": env["UNAME_M"], "platform_machine": info.get("machine")},
    "python": info.get("python"),
    "versions": {k: info.get(k) for k in ("numpy", "numba", "llvmlite", "torch", "transformers", "peft",
                                           "bitsandbytes", "onnx", "tokenizers", "safetensors", "pytest",
                                           "hypothesis", "edgelora")},
    "numba": {"NUMBA_CPU_NAME": info.get("numba_cpu_name_env"), "llvm_host_cpu": info.get("llvm_host_cpu"),
              "threads": info.get("numba_threads")},
    "kernels": {"simd": info.get("simd"), "nf4_dot_variants": info.get("nf4_dot_variants"),
                "nf4_dot_selected": info.get("nf4_dot_selected"), "qemu_cpu": info.get("qemu_cpu"),
                "cpu_extensions": info.get("cpu_extensions"), "int8_variants": info.get("int8_variants"),
                "int8_selected": info.get("int8_selected")},
    "pytest_command": env["PYTEST_CMD_STR"], "pytest_summary": env["SUMMARY_LINE"],
    "pytest_exit_code": int(env["RC"]),
    **counts, "failed_tests": failed,
    "tests_seconds": int(env["TEST_SECONDS"]), "elapsed_seconds": int(env["ELAPSED"]),
}
out = env["RESULT"]
fd, tmp = tempfile.mkstemp(prefix=".arm64.", suffix=".json.tmp", dir=os.path.dirname(out))
with os.fdopen(fd, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, out)
PY

info() { python3 -c 'import json, os, sys; print(sys.argv[1].format(**json.loads(os.environ["INFO_JSON"])))' "$1"; }
cat <<EOF

================ arm64 proof ================
qemu:            $QEMU_VERSION (binfmt: $INTERP)
debian:          $DEBIAN_VERSION (root: $ROOT)
uname -m:        $UNAME_M
emulated python: $(info "platform.machine()={machine} python {python} numpy {numpy} numba {numba} llvmlite {llvmlite} torch {torch} transformers {transformers} peft {peft}")
kernels:         $(info "runtime.simd.SIMD={simd} NF4 dot variants={nf4_dot_variants} selected={nf4_dot_selected} NUMBA_CPU_NAME={numba_cpu_name_env}")
int8:            $(info "QEMU_CPU={qemu_cpu} HWCAP extensions={cpu_extensions} int8 variants={int8_variants} selected={int8_selected}")
pytest:          ${PYTEST_CMD[*]}
summary:         ${SUMMARY_LINE:-<none>}
exit code:       $RC
tests took:      ${TEST_SECONDS}s; whole run ${ELAPSED}s
result:          $RESULT
=============================================
EOF
exit "$RC"
