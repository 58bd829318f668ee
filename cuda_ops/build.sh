#!/usr/bin/env bash
# Builds the eqc onnxruntime custom-op library (domain ai.eqc).
#   build/cuda_ops/libeqc_ops.so       CPU kernel; no CUDA dependency (always built)
#   build/cuda_ops/libeqc_ops_cuda.so  CPU + CUDA kernels + C entry points (when nvcc is found)
#   build/cuda_ops/build_info.json     what was built (read by the tests)
# Idempotent: headers are fetched once into cuda_ops/third_party/, CMake rebuilds only what changed,
# and outputs are replaced (atomically) only when their content changed.
# Env: NVCC=/path/to/nvcc (must exist if set; default: PATH, then $CUDA_HOME/bin with CUDA_HOME=/usr/local/cuda),
#      EQC_OPS_CUDA=0 to skip CUDA, EQC_CUDA_ARCHS="80;90a" (90a = Hopper cubin with the wgmma kernels), JOBS=N.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/cuda_ops"
OUT="$ROOT/build/cuda_ops"
BLD="$OUT/cmake"
CACHE="$SRC/third_party"

ORT_NPM_PKG="com.github.asus4.onnxruntime"
ORT_NPM_VER="0.4.9"  # ships the official onnxruntime 1.29 headers (ORT_API_VERSION 29)
# The exact tarball, pinned by the registry's integrity hash (`npm view $PKG@$VER dist.integrity`); a download
# whose sha512 differs is refused before anything is extracted.
ORT_NPM_INTEGRITY="sha512-BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg=="
# The tarball is a Unity plugin; the only copy of the C/C++ headers is inside the iOS framework.
ORT_HDR_IN_TGZ="package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers"
ORT_INC="$CACHE/onnxruntime-$ORT_NPM_VER/include"
ARCHS="${EQC_CUDA_ARCHS:-80;90a}"

FETCH_TMP=""
die() { echo "eqc ops: error: $*" >&2; exit 1; }

sha512_hex() { sha512sum "$1" | cut -d' ' -f1; }
# An npm integrity string ("sha512-<base64>") as the hex digest sha512sum prints.
integrity_hex() { echo "${1#sha512-}" | base64 -d | od -An -tx1 | tr -d ' \n'; }

# Download (npm pack), verify the pinned integrity, extract only the headers. The cache keeps the sha256 of
# every header it extracted (.sha256) and is checked on every build: an edited header is an error.
fetch_ort_headers() {
  local tmp
  local stamp="$ORT_INC/.sha256"
  if [[ -f "$stamp" && -f "$ORT_INC/.integrity" && "$(cat "$ORT_INC/.integrity")" == "$ORT_NPM_INTEGRITY" ]]; then
    (cd "$ORT_INC" && sha256sum --quiet --strict -c .sha256 >/dev/null 2>&1) ||
      die "cached onnxruntime headers in $ORT_INC differ from the verified download; delete $CACHE to fetch them again"
    return 0
  fi
  command -v npm >/dev/null 2>&1 || die "npm not found; needed once to fetch onnxruntime headers ($ORT_NPM_PKG@$ORT_NPM_VER)"
  mkdir -p "$CACHE"
  tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
  FETCH_TMP="$tmp"
  trap 'rm -rf "$FETCH_TMP"' EXIT
  if ! (cd "$tmp" && npm pack "$ORT_NPM_PKG@$ORT_NPM_VER" --loglevel=error >"$tmp/npm.log" 2>&1); then
    # npm >= 10 says "npm error ...", older ones "npm ERR! ..."; else show its last line.
    local why
    why="$(grep -m 1 -iE 'err(or|!)' "$tmp/npm.log" 2>/dev/null || tail -n 1 "$tmp/npm.log" 2>/dev/null || true)"
    die "failed to download onnxruntime headers with 'npm pack $ORT_NPM_PKG@$ORT_NPM_VER' (${why:0:160})"
  fi
  local tgz="$tmp/$ORT_NPM_PKG-$ORT_NPM_VER.tgz"
  [[ -f "$tgz" ]] || die "npm pack produced no $ORT_NPM_PKG-$ORT_NPM_VER.tgz"
  local got want
  got="$(sha512_hex "$tgz")"
  want="$(integrity_hex "$ORT_NPM_INTEGRITY")"
  [[ "$got" == "$want" ]] || die "integrity mismatch for $ORT_NPM_PKG-$ORT_NPM_VER.tgz: sha512 ${got:0:16}..., pinned ${want:0:16}... ($ORT_NPM_INTEGRITY)"
  tar -xzf "$tgz" -C "$tmp" "$ORT_HDR_IN_TGZ" 2>"$tmp/tar.log" || die "headers not found in tarball at $ORT_HDR_IN_TGZ"
  mkdir -p "$tmp/stage/include"
  cp "$tmp/$ORT_HDR_IN_TGZ"/*.h "$tmp/stage/include/"
  (cd "$tmp/stage/include" && sha256sum -- *.h >.sha256)
  echo "$ORT_NPM_INTEGRITY" >"$tmp/stage/include/.integrity"
  rm -rf "$CACHE/onnxruntime-$ORT_NPM_VER"
  mv "$tmp/stage" "$CACHE/onnxruntime-$ORT_NPM_VER"
  rm -rf "$tmp"
}

find_nvcc() {
  if [[ "${EQC_OPS_CUDA:-1}" == "0" ]]; then return 1; fi
  local c
  for c in "$(command -v nvcc 2>/dev/null || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; do
    if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return 0; fi
  done
  return 1
}

# Copy $1 to $2 through a temp file + rename, only if the content differs (keeps mtimes stable).
install_if_changed() {
  local src="$1" dst="$2"
  if [[ -f "$dst" ]] && cmp -s "$src" "$dst"; then return 0; fi
  cp "$src" "$dst.tmp.$$"
  mv -f "$dst.tmp.$$" "$dst"
}

main() {
  fetch_ort_headers
  command -v cmake >/dev/null 2>&1 || die "cmake not found"

  local nvcc="" with_cuda=OFF
  if [[ -n "${NVCC:-}" && "${EQC_OPS_CUDA:-1}" != "0" ]]; then
    # Asked for by name: a wrong path is an error, not a silent CPU-only build.
    [[ -x "$NVCC" ]] || die "NVCC=$NVCC is not an executable file (unset NVCC to search PATH, or EQC_OPS_CUDA=0 for a CPU-only build)"
    nvcc="$NVCC" with_cuda=ON
  elif nvcc="$(find_nvcc)"; then
    with_cuda=ON
  else
    echo "eqc ops: nvcc not found; building the CPU kernel only (set NVCC=/path/to/nvcc for the CUDA kernel)"
  fi

  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  local args=("${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR="$ORT_INC" -DEQC_WITH_CUDA="$with_cuda"
              -DEQC_CUDA_ARCHS="$ARCHS")
  [[ "$with_cuda" == ON ]] && args+=(-DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_HOST_COMPILER="$(command -v g++ || echo c++)")

  # Reconfigure only when the configuration changed (a full configure probes nvcc: seconds).
  mkdir -p "$BLD"
  local sig="${args[*]}"
  if [[ ! -f "$BLD/CMakeCache.txt" || ! -f "$BLD/.eqc-config" || "$(cat "$BLD/.eqc-config")" != "$sig" ]]; then
    rm -rf "$BLD"
    mkdir -p "$BLD"
    cmake -S "$SRC" -B "$BLD" "${args[@]}" >"$OUT/cmake-configure.log" 2>&1 ||
      { tail -n 20 "$OUT/cmake-configure.log" >&2; die "cmake configure failed (log: $OUT/cmake-configure.log)"; }
    echo "$sig" >"$BLD/.eqc-config"
  fi
  cmake --build "$BLD" -j "${JOBS:-$(nproc 2>/dev/null || echo 2)}" >"$OUT/cmake-build.log" 2>&1 ||
    { tail -n 30 "$OUT/cmake-build.log" >&2; die "build failed (log: $OUT/cmake-build.log)"; }

  install_if_changed "$BLD/libeqc_ops.so" "$OUT/libeqc_ops.so"
  local cuda_json="false" archs_json="[]"
  if [[ "$with_cuda" == ON ]]; then
    install_if_changed "$BLD/libeqc_ops_cuda.so" "$OUT/libeqc_ops_cuda.so"
    cuda_json="true"
    archs_json="[\"$(echo "$ARCHS" | sed 's/;/", "/g')\"]"
  else
    rm -f "$OUT/libeqc_ops_cuda.so"  # never leave a stale CUDA build next to a CPU-only one
  fi
  local info="$OUT/.build_info.json.new"
  printf '{"cpu_library": "libeqc_ops.so", "cuda": %s, "cuda_library": %s, "cuda_archs": %s, "nvcc": "%s", "ort_headers": "%s@%s", "ort_api_version": %s}\n' \
    "$cuda_json" "$([[ $with_cuda == ON ]] && echo '"libeqc_ops_cuda.so"' || echo null)" "$archs_json" "$nvcc" \
    "$ORT_NPM_PKG" "$ORT_NPM_VER" "$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$ORT_INC/onnxruntime_c_api.h")" >"$info"
  install_if_changed "$info" "$OUT/build_info.json"
  rm -f "$info"
  echo "eqc ops: $OUT/libeqc_ops.so$([[ $with_cuda == ON ]] && echo " + libeqc_ops_cuda.so (sm_${ARCHS//;/, sm_})")"
}

main "$@"
