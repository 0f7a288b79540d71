#!/usr/bin/env bash
# Builds the pyswitch C++ SDK from this checkout with plain CMake (no Python module), installs it
# into a temporary prefix, builds cpp/examples/embed against that prefix with
# find_package(pyswitch), and runs the example. Exits non-zero on any failure.
#
#   cpp/examples/embed/run.sh [--keep DIR] [-- EXAMPLE_ARGS...]
#
#   --keep DIR    build and install under DIR and keep it (default: a temporary directory,
#                 removed at exit); the example is then DIR/example/pyswitch_embed
#   EXAMPLE_ARGS  passed to the example, e.g. --run RUN_DIR --val FILE (see main.cpp)
#
# Needs a C++17 compiler, CMake >= 3.21 and Ninja or Make, and oneDNN's CMake package. When
# CMAKE_PREFIX_PATH does not lead to oneDNN, a private virtualenv with the pip packages
# onednn-devel-cpu-gomp, cmake and ninja is made under the work directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
work=""
example_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keep) work=$2; shift 2 ;;
    --) shift; example_args=("$@"); break ;;
    *) echo "run.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [[ -z "$work" ]]; then
  work=$(mktemp -d /tmp/pyswitch-embed.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
work=$(cd "$work" && pwd)
python=${PYTHON:-python3}

# oneDNN (and the build tools) from the active environment when it has them, else a private venv.
prefix_path=${CMAKE_PREFIX_PATH:-}
has_dnnl() {
  local p
  for p in ${1//:/ }; do
    [[ -f "$p/lib/cmake/dnnl/dnnlConfig.cmake" || -f "$p/lib64/cmake/dnnl/dnnlConfig.cmake" ]] && return 0
  done
  return 1
}
if ! has_dnnl "$prefix_path"; then
  env_prefix=$("$python" -c 'import sys; print(sys.prefix)' 2>/dev/null || true)
  if [[ -n "$env_prefix" ]] && has_dnnl "$env_prefix"; then
    prefix_path="$env_prefix${prefix_path:+:$prefix_path}"
  else
    echo "run.sh: oneDNN's CMake package not found; installing build tools into $work/tools"
    "$python" -m venv "$work/tools"
    "$work/tools/bin/pip" install -q "onednn-devel-cpu-gomp==2023.2.0" cmake ninja
    prefix_path="$work/tools${prefix_path:+:$prefix_path}"
    export PATH="$work/tools/bin:$PATH"
  fi
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

echo "== configure and install the SDK into $work/prefix"
cmake -S "$root" -B "$work/sdk" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix_path" -DPYSWITCH_BUILD_PYTHON=OFF -DPYSWITCH_BUILD_TESTS=OFF \
  ${PYSWITCH_SDK_CMAKE_ARGS:-} >"$work/sdk-configure.log" || {
  cat "$work/sdk-configure.log"; exit 1; }
grep "pyswitch:" "$work/sdk-configure.log" | sed 's/^-- /   /'
cmake --build "$work/sdk" --parallel
cmake --install "$work/sdk" --prefix "$work/prefix" >/dev/null

echo "== build the example against the installed package only"
cmake -S "$here" -B "$work/example" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix;${prefix_path//:/;}" >"$work/example-configure.log" || {
  cat "$work/example-configure.log"; exit 1; }
grep "pyswitch_embed:" "$work/example-configure.log" | sed 's/^-- /   /'
cmake --build "$work/example" --parallel

echo "== run $work/example/pyswitch_embed ${example_args[*]:-}"
"$work/example/pyswitch_embed" "${example_args[@]}"
