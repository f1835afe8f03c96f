#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks into .whl/, for tools/gpu-check.sh.
#
# The GPU machine (docs: /work/.library/device/KINDS.md) has Python 3.12, torch, transformers, safetensors,
# numpy, scipy, pillow, huggingface-hub and pytest, but no diffusers (difusi's UNet/VAE classes and the
# reference pipelines) and no torchsde (+ trampoline; the SDE samplers' Brownian trees). Nothing can be
# downloaded there, so the wheels travel with the working tree (`carry=[".whl"]`). fastapi/uvicorn/pydantic
# are absent there too but not carried: the GPU tests and the bench never import difusi.server.
#
# Versions are the ones this repo's .venv runs (so the GPU run tests the code against the same diffusers),
# falling back to the pins below when there is no .venv. All three are pure-python (py3-none-any) wheels.
# Usage: bash tools/gpu-wheels.sh            (run from anywhere; writes <repo>/.whl/)
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A FALLBACK=([diffusers]=0.42.1 [torchsde]=0.2.6 [trampoline]=0.1.2)
PACKAGES=(diffusers torchsde trampoline)
LIMIT_MIB=50

version_of() {  # the .venv's installed version of $1, else the fallback pin
    local found=""
    if [[ -x .venv/bin/python ]]; then
        found=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true)
    fi
    echo "${found:-${FALLBACK[$1]}}"
}

# .whl/ must never be committed: ignore it locally (append only; .git/info/exclude is per-clone).
git_dir=$(git rev-parse --git-dir)
mkdir -p "$git_dir/info"
grep -qxF '/.whl/' "$git_dir/info/exclude" 2>/dev/null || echo '/.whl/' >>"$git_dir/info/exclude"

mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version=$(version_of "$name")
    wanted="$name-$version-"
    # One version of each package: two would make the GPU machine's `pip install --no-index` refuse to run.
    for old in .whl/"$name"-*.whl; do
        [[ -e "$old" && "$(basename "$old")" != "$wanted"* ]] && rm -f "$old"
    done
    if compgen -G ".whl/$wanted*.whl" >/dev/null; then
        echo "have $(basename .whl/"$wanted"*.whl)"
        continue
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
    echo "got  $(basename .whl/"$wanted"*.whl)"
done

total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
printf 'total %.1f MiB in .whl/\n' "$(echo "$total / 1048576" | bc -l)"
if (( total > LIMIT_MIB * 1048576 )); then
    echo "error: .whl/ is over $LIMIT_MIB MiB; the whole working tree must stay under 64 MiB to travel" >&2
    exit 1
fi
