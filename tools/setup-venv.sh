# Sourced by run.sh and test.sh: create .venv and install difusi into it (once; re-run when pyproject changes).
# torch is pinned to the CPU wheel first: an unpinned resolve would pull a multi-GB CUDA build.
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=".venv/.difusi-installed-${DIFUSI_EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  if [ -n "${DIFUSI_EXTRAS:-}" ]; then
    python -m pip install -q --disable-pip-version-check -e ".[${DIFUSI_EXTRAS}]"
    case "${DIFUSI_EXTRAS}" in
      # The upscaler tests' reference (spandrel's architectures on the same weights). --no-deps, so not in the
      # test extra: its declared dependencies pull torchvision, which does not import against the CPU torch here.
      *test*) python -m pip install -q --disable-pip-version-check --no-deps "spandrel==0.4.2" ;;
    esac
  else
    python -m pip install -q --disable-pip-version-check -e .
  fi
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
