#!/usr/bin/env bash
# tools/gpu-check.sh — issue 17's prepared GPU check: on a bare GPU machine, install the carried wheels, report the
# machine, record torch's CUDA randn (the NV reference), run the GPU tests (tests/gpu + tests/rng/test_cuda_reference.py)
# and the GPU bench (bench/gpu_speed.py), and write everything to $OUT, all within about 7.5 minutes.
#
# THE ONE CALL, when a GPU machine is lent (device tool; run `bash tools/gpu-wheels.sh` here first, once):
#
#     run(command="bash tools/gpu-check.sh", carry=[".whl"], timeout_s=540)
#
# It comes back with (in files_at): gpu-check.md (the "Results" section of docs/bench/gpu.md), gpu-check.json (the
# same, machine-readable: machine, phases, test outcomes, every measured number, bench rows), gpu-check.log (full
# output), cuda_randn_reference.json (commit as tests/rng/cuda_randn_reference.json), gpu-bench.json/.md (the bench).
# A second, shorter call (if device time is left) can redo one part, e.g.
#     run(command="DIFUSI_GPU_CHECK_PHASES=env,bench DIFUSI_GPU_BENCH_ARGS='--kinds compile' bash tools/gpu-check.sh",
#         carry=[".whl"], timeout_s=540)
# (bench/gpu_speed.py --help: --sections sd15,sdxl --kinds speed,memory,compile --quick --repeats N ...)
#
# Dry run on a machine without a GPU (checks that nothing here crashes; tiny sizes, CPU, a temporary OUT):
#     DIFUSI_GPU_CHECK_DRY=1 bash tools/gpu-check.sh
# It runs the same phases with .venv's python in an overlay that hides the packages the GPU machine lacks (fastapi,
# pydantic, ...: KINDS.md's list of 2026-11-17) and takes diffusers/torchsde from the carried wheels, as there.
#
# Environment: DIFUSI_GPU_CHECK_BUDGET (seconds for all phases, default 460), DIFUSI_GPU_CHECK_PHASES
# (comma list of env,record,tests,bench), DIFUSI_GPU_BENCH_ARGS (extra bench/gpu_speed.py arguments),
# DIFUSI_GPU_TEST_ARGS (extra pytest arguments, e.g. "-k noise").
# difusi's pyproject pins Python <3.12 and torch 2.13; the GPU machine has 3.12 and torch 2.11, so the project is
# not installed there: it runs from src/ through PYTHONPATH.
set -uo pipefail  # no -e: a failing phase is recorded and the next one still runs

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=${DIFUSI_GPU_CHECK_DRY:-0}
BUDGET=${DIFUSI_GPU_CHECK_BUDGET:-460}
PHASES=${DIFUSI_GPU_CHECK_PHASES:-env,record,tests,bench}
# A phase runs as `bash tools/gpu-check.sh --phase NAME` under `timeout` (which kills its whole process group);
# the parent passes its clock, scratch folder and OUT down through the environment.
STARTED=${GPU_CHECK_STARTED:-$(date +%s)}
DEADLINE=$((STARTED + BUDGET))
# Scratch: phase table, junit xml, measurements, overlay (kept out of $OUT, which brings back at most 8 files).
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
export GPU_CHECK_STARTED=$STARTED GPU_CHECK_WORK=$WORK

# Packages the GPU machine does not have (KINDS.md, 2026-11-17), hidden in the dry run; diffusers, torchsde and
# trampoline among them come from .whl/ as on the GPU machine. Not hidden although absent there: httpx2, httpcore2
# and truststore (this .venv's newer huggingface_hub needs them; the GPU machine's 1.33 uses httpx) and tzdata.
ABSENT="annotated-types,diffusers,difusi,fastapi,graphql-core,greenlet,harfile,hypothesis-graphql,importlib-metadata,\
jsonschema-rs,lazy-importer,opentelemetry-api,playwright,pydantic,pydantic-core,pyrate-limiter,python-multipart,ruff,\
schemathesis,sd-parsers,starlette,swagger-ui-py,torchsde,trampoline,typing-inspection,uvicorn"

if [[ "$DRY" == 1 ]]; then
    OUT=${OUT:-$(mktemp -d /tmp/gpu-check-out.XXXXXX)}
    SITE=$WORK/site
    PY=("$ROOT/.venv/bin/python" -S)  # -S: no site-packages but the overlay below, as on a machine without them
    TEST_ARGS=()
    BENCH_ARGS=(--dry --cache "$WORK/bench-cache")
else
    OUT=${OUT:?OUT must be set (the device tool sets it)}
    SITE=/tmp/site
    PY=(python3)
    TEST_ARGS=()
    BENCH_ARGS=()
fi
mkdir -p "$OUT" "$SITE"
export OUT
LOG=$OUT/gpu-check.log
export PYTHONUNBUFFERED=1 DIFUSI_GPU_CHECK_DRY="$DRY" DIFUSI_GPU_MEASUREMENTS="$WORK/measurements.json"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing can be reached there; fail fast, never wait on a network

has_phase() { [[ ",$PHASES," == *",$1,"* ]]; }

# phase NAME SECONDS FUNCTION: runs FUNCTION in a child of this script under `timeout` (capped by the overall
# deadline), and records its status, rc and seconds.
phase() {
    local name=$1 want=$2 function=$3
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((want < left ? want : left))
    if ((limit < 5)); then
        echo "=== $name: skipped, ${left}s left of the ${BUDGET}s budget"
        printf '%s\tskipped\t0\t0\n' "$name" >>"$WORK/phases.tsv"
        return
    fi
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S) ==="
    local start=$SECONDS
    timeout --kill-after=10 "$limit" bash "$ROOT/tools/gpu-check.sh" --phase "$function"
    local rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0 && rc != 124 && rc != 137)) && status=failed
    echo "=== $name: $status (rc $rc, $((SECONDS - start))s)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" >>"$WORK/phases.tsv"
}

install() {
    if [[ "$DRY" == 1 ]]; then
        # The overlay: every .venv site-packages entry except the absent packages' files (no .pth: -S ignores them).
        "$ROOT/.venv/bin/python" - "$WORK/overlay" "$ABSENT" <<'PY' || return 1
import importlib.metadata as metadata, pathlib, sys, sysconfig
out, absent = pathlib.Path(sys.argv[1]), set(sys.argv[2].split(","))
site = pathlib.Path(sysconfig.get_paths()["purelib"])
hidden = set()
for dist in metadata.distributions():
    if dist.metadata["Name"].lower().replace("_", "-") in absent:
        hidden.update(path.parts[0] for path in dist.files or [])
out.mkdir(parents=True, exist_ok=True)
for entry in site.iterdir():
    if entry.name not in hidden and entry.suffix != ".pth":
        (out / entry.name).symlink_to(entry)
print(f"overlay: {len(list(out.iterdir()))} entries of {site}, hidden: {len(hidden)}")
PY
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        local pip=("${PY[@]}")
        [[ "$DRY" == 1 ]] && pip=("$ROOT/.venv/bin/python")  # pip itself is not in the -S overlay's job
        "${pip[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || return 1
        ls .whl
    else
        echo "no .whl/ carried: diffusers/torchsde must already be importable (carry=[\".whl\"] after tools/gpu-wheels.sh)"
    fi
}

env_report() {
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
    "${PY[@]}" - "$WORK/env.json" <<'PY'
import json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), driver=torch.cuda.driver_version()
                    if hasattr(torch.cuda, "driver_version") else None)
except Exception as error:  # report, do not stop: the summary says what broke
    info["torch_error"] = repr(error)
try:
    import subprocess
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
    info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as error:
    info["nvidia_smi"] = f"unavailable: {error!r}"
for name in ("diffusers", "transformers", "safetensors", "numpy", "torchsde", "huggingface_hub", "PIL"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"import failed: {error!r}"
try:
    import difusi.devices as devices
    info["difusi_auto_device"] = str(devices.resolve_device("auto"))
    info["difusi_auto_precision"] = devices.resolve_precision("auto", devices.resolve_device("auto")).name
except Exception as error:
    info["difusi_devices_error"] = repr(error)
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info))
PY
}

record_reference() {
    if [[ "$DRY" == 1 ]]; then
        echo "dry run: no CUDA to record (tests/rng/test_cuda_reference.py checks the recorder's format on the CPU)"
        return 0
    fi
    "${PY[@]}" tools/record_cuda_randn.py --output "$OUT/cuda_randn_reference.json" || return 1
    # In this machine's copy of the tree only (it never comes back): lets tests/rng/test_cuda_reference.py check
    # NV and the GPU source against every recorded case in the tests phase.
    cp "$OUT/cuda_randn_reference.json" tests/rng/cuda_randn_reference.json
}

run_tests() {
    local extra=()
    "${PY[@]}" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=150)  # one hung test must not eat the phase
    # shellcheck disable=SC2206  # word splitting of the user's extra arguments is intended
    extra+=(${DIFUSI_GPU_TEST_ARGS:-})
    # faulthandler_timeout: a test stuck for 140 s prints every thread's stack into the log (then the phase's
    # timeout or pytest-timeout ends it), so a hang on the GPU machine still says where it hung.
    "${PY[@]}" -m pytest -q tests/gpu tests/rng/test_cuda_reference.py -p no:cacheprovider -rfEs \
        -o faulthandler_timeout=140 --durations=10 \
        --junitxml="$WORK/gpu-tests.xml" "${TEST_ARGS[@]}" "${extra[@]}"
}

run_bench() {
    local left=$((DEADLINE - $(date +%s) - 25))  # the bench stops starting sections before the phase is killed
    # shellcheck disable=SC2206
    local extra=(${DIFUSI_GPU_BENCH_ARGS:-})
    "${PY[@]}" bench/gpu_speed.py --out "$OUT" --budget "$left" "${BENCH_ARGS[@]}" "${extra[@]}"
}

summary() {
    "${PY[@]}" - "$WORK" "$OUT" "$DRY" "$BUDGET" "$(($(date +%s) - STARTED))" <<'PY'
import json, pathlib, sys, time
import xml.etree.ElementTree as ET
work, out, dry, budget, wall = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1", *sys.argv[4:]
def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"missing": f"{path.name}: {error}"}
phases = []
if (work / "phases.tsv").exists():
    for line in (work / "phases.tsv").read_text().splitlines():
        name, status, rc, seconds = line.split("\t")
        phases.append({"phase": name, "status": status, "rc": int(rc), "seconds": int(seconds)})
tests = {"passed": [], "failed": {}, "skipped": {}}
if (work / "gpu-tests.xml").exists():
    for case in ET.parse(work / "gpu-tests.xml").iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        problem = case.find("error") if problem is None else problem
        skipped = case.find("skipped")
        if problem is not None:
            tests["failed"][name] = (problem.get("message") or "")[:600]
        elif skipped is not None:
            tests["skipped"][name] = (skipped.get("message") or "")[:300]
        else:
            tests["passed"].append(name)
tests["counts"] = {key: len(value) for key, value in tests.items()}
bench = load(out / "gpu-bench.json")
result = {
    "dry_run": dry, "budget_s": int(budget), "wall_s": int(wall),
    "ok": all(p["status"] in ("ok", "skipped") for p in phases) and not tests["failed"] and not bench.get("errors"),
    "phases": phases, "env": load(work / "env.json"), "tests": tests,
    "measurements": load(work / "measurements.json"),
    "bench": bench, "cuda_randn_reference": (out / "cuda_randn_reference.json").exists(),
}
(out / "gpu-check.json").write_text(json.dumps(result, indent=1))
# The page for docs/bench/gpu.md's "Results": machine, phases, tests, every measured number, the bench table.
env = result["env"]
md = [f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC by `bash tools/gpu-check.sh`"
      + (" (DRY RUN on the CPU: not a measurement)" if dry else "") + ".",
      "", f"Machine: {env.get('gpu', 'no GPU')} ({env.get('memory_gib', '?')} GiB, compute capability "
      f"{env.get('capability', '?')}); torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
      f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, Python {env.get('python')}.",
      "", "Phases: " + ", ".join(f"{p['phase']} {p['status']} ({p['seconds']} s)" for p in phases) + ".",
      "", f"Tests: {tests['counts']['passed']} passed, {tests['counts']['failed']} failed, "
      f"{tests['counts']['skipped']} skipped."]
md += [f"- FAILED `{name}`: {message.splitlines()[0] if message else ''}" for name, message in tests["failed"].items()]
md += [f"- skipped `{name}`: {message}" for name, message in tests["skipped"].items() if "not implemented" in message]
md += ["", "| measurement | values |", "|---|---|"]
for name, value in sorted(result["measurements"].items()):
    md.append(f"| {name} | {json.dumps(value, sort_keys=True)[:300]} |")
bench_md = out / "gpu-bench.md"
md += ["", "### Bench", "", bench_md.read_text() if bench_md.exists() else "(no bench results)"]
(out / "gpu-check.md").write_text("\n".join(md) + "\n")
print(f"gpu-check: {'OK' if result['ok'] else 'PROBLEMS'}; phases "
      + ", ".join(f"{p['phase']} {p['status']} {p['seconds']}s" for p in phases)
      + f"; tests {tests['counts']}; bench rows {len(bench.get('runs', []))}, skipped {len(bench.get('skipped', []))},"
      f" errors {len(bench.get('errors', []))}; wall {wall}s; files in {out}")
for name, message in tests["failed"].items():
    print(f"FAILED {name}: {message.splitlines()[0] if message else ''}")
sys.exit(0 if result["ok"] else 1)
PY
}

phase_python_path() {
    if [[ "$DRY" == 1 ]]; then
        # DIFUSI_GPU_CHECK_EXTRA_PATH: folders of the GPU machine's versions of packages (e.g. transformers 5.17 and
        # huggingface_hub 1.33 installed with `pip install --target`), to try them here before a GPU session.
        export PYTHONPATH="$SITE${DIFUSI_GPU_CHECK_EXTRA_PATH:+:$DIFUSI_GPU_CHECK_EXTRA_PATH}:$ROOT/src:$WORK/overlay"
    else
        export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

main() {
    echo "gpu-check: dry=$DRY budget=${BUDGET}s phases=$PHASES out=$OUT $(date -u +%FT%TZ)"
    phase install 60 install
    phase_python_path
    has_phase env && phase env 60 env_report
    has_phase record && phase record 60 record_reference
    has_phase tests && phase tests 170 run_tests
    has_phase bench && phase bench 600 run_bench
    summary
    local rc=$?
    ls -la "$OUT"
    return $rc
}

if [[ "${1:-}" == --phase ]]; then
    [[ "$2" == install ]] || phase_python_path
    "$2"
    exit $?
fi
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
