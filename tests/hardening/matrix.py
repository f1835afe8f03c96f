"""The bad-input matrix: one row per case, run by test_matrix.py and tools/hardening_matrix.py (docs/hardening.md).

Placeholders: {models} is the matrix's models folder (bad files only, see hardening_harness.build_files),
{outside} a folder next to it, {root} their parent, {bomb} a decompression-bomb PNG in base64.
"""

from __future__ import annotations

from hardening_harness import Case, Expect

from difusi.params import MAX_PROMPT_CHARS, SEED_MAX

LONG = "x" * (MAX_PROMPT_CHARS + 1)
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5}
"""Body fields that make an accepted HTTP request cheap."""
BUDGET_HINT = "raise the budget"


def cli(case_id: str, what: str, argv: list[str], flag: str | None, text: str, code: int = 2) -> Case:
    return Case(case_id, "cli", what, {"argv": ["generate", *argv]}, Expect(f"exit {code}", flag, text))


def api(case_id: str, what: str, args: dict, error: str, field: str | None, text: str) -> Case:
    return Case(case_id, "api", what, {"call": "generate", "args": args}, Expect(error, field, text))


def load(case_id: str, what: str, path: str, error: str, text: str) -> Case:
    return Case(case_id, "api", what, {"call": "load_model", "path": path}, Expect(error, None, text))


def http(case_id: str, what: str, body: dict | None, status: int, field: str | None, text: str, *,
         path: str = "/sdapi/v1/txt2img", method: str = "POST", content: str | None = None,
         params: dict | None = None) -> Case:
    run: dict = {"method": method, "path": path}
    if body is not None:
        run["json"] = body
    if content is not None:
        run["content"] = content
    if params is not None:
        run["params"] = params
    return Case(case_id, "http", what, run, Expect(str(status), field, text))


def deeply_nested(depth: int) -> list:
    """[[[...]]] `depth` levels deep: JSON parsers that recurse can overflow on these."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def model_override(name: str) -> dict:
    return {**SMALL, "override_settings": {"sd_model_checkpoint": name}}


CASES: list[Case] = [
    # -- CLI: field types and ranges, budget, prompts, names, files ------------------------------------------
    cli("cli-steps-range", "--steps 0", ["a cat", "--steps", "0"], "--steps", "must be in [1, 1000], got 0"),
    cli("cli-steps-type", "--steps abc", ["a cat", "--steps", "abc"], "--steps", "must be an integer, got 'abc'"),
    cli("cli-cfg-nan", "--cfg-scale nan", ["a cat", "--cfg-scale", "nan"], "--cfg-scale", "must be a number, got 'nan'"),
    cli("cli-seed-range", f"--seed {SEED_MAX + 1}", ["a cat", "--seed", str(SEED_MAX + 1)], "--seed",
        f"must be -1 (random) or in [0, {SEED_MAX}]"),
    cli("cli-width-multiple", "--width 100", ["a cat", "--width", "100"], "--width", "must be a multiple of 8, got 100"),
    cli("cli-budget-pixels", "--width 4096 --height 4096 (16.8 Mpx, one image)",
        ["a cat", "--width", "4096", "--height", "4096"], "--width", "over the budget of 4194304 pixels per image"),
    cli("cli-budget-batch", "--width 1024 --height 1024 --batch-size 8 (8.4 Mpx in one batch)",
        ["a cat", "--width", "1024", "--height", "1024", "--batch-size", "8"], "--batch-size",
        "8388608 pixels in one batch is over the budget of 4194304"),
    cli("cli-budget-lowered", "--max-batch-pixels 10000 --width 128 --height 128",
        ["a cat", "--max-batch-pixels", "10000", "--width", "128", "--height", "128"], "--batch-size",
        "over the budget of 10000"),
    cli("cli-budget-flag", "--max-pixels 0", ["a cat", "--max-pixels", "0"], "--max-pixels", "must be >= 1, got 0"),
    cli("cli-prompt-huge", f"a {MAX_PROMPT_CHARS + 1}-character prompt", [LONG], "PROMPT",
        f"must be at most {MAX_PROMPT_CHARS} characters"),
    cli("cli-prompt-undecodable", "a prompt with undecodable bytes (argv b'\\xff' -> U+DCFF)", ["a \udcff cat"],
        "PROMPT", "must be valid Unicode text"),
    # A `when` that is not a number ('[cat:dog:soon]') is literal text since issue 19, as in A1111 (see
    # http-prompt-not-editing); a negative one is still refused (A1111 would use 'dog' from the first step).
    cli("cli-prompt-bad-when", "prompt '[cat:dog:-1]'", ["[cat:dog:-1]"], "PROMPT", "got negative '-1'"),
    cli("cli-prompt-deep", "prompt with 5000 nested '('", ["(" * 5000 + "cat"], "PROMPT", "after nesting; at most 1000"),
    cli("cli-sampler-unknown", "--sampler Eulerr", ["a cat", "--sampler", "Eulerr"], "--sampler", "Eulerr"),
    cli("cli-scheduler-unknown", "--scheduler Karass", ["a cat", "--scheduler", "Karass"], "--scheduler", "Karass"),
    cli("cli-model-unknown", "--model nosuch", ["a cat", "--model", "nosuch"], "--model", "'nosuch' not found"),
    cli("cli-model-zero-byte", "--model {models}/empty.safetensors (0 bytes)",
        ["a cat", "--model", "{models}/empty.safetensors"], None, "not a valid safetensors file"),
    cli("cli-model-pickle-code", "--model {models}/evil.ckpt (pickle runs os.system)",
        ["a cat", "--model", "{models}/evil.ckpt"], None, "it was NOT executed"),
    cli("cli-output-missing-dir", "--output /no/such/dir/x.png", ["a cat", "--output", "/no/such/dir/x.png"],
        "--output", "folder /no/such/dir does not exist"),
    cli("cli-output-symlink", "--output {root}/link.png (an existing symlink to a file outside)",
        ["a cat", "--output", "{root}/link.png"], "--output", "exists (difusi never overwrites files)"),
    cli("cli-from-binary", "--from a file of random bytes named .png", ["--from", "{root}/binary.png"], "--from",
        "cannot read"),
    # -- Python API: typed exceptions naming the field ---------------------------------------------------------
    api("api-steps-type", "steps='many'", {"steps": "many"}, "ParamError", "steps", "must be a number, got 'many'"),
    api("api-cfg-range", "cfg_scale=101", {"cfg_scale": 101}, "ParamError", "cfg_scale", "must be in [0, 100], got 101"),
    api("api-width-bool", "width=True", {"width": True, "height": 64}, "ParamError", "width", "must be a number, got True"),
    api("api-batch-range", "batch_size=0", {"batch_size": 0}, "ParamError", "batch_size", "must be in [1, 64], got 0"),
    api("api-subseed-strength", "subseed_strength=float('nan')", {"subseed_strength": float("nan")}, "ParamError",
        "subseed_strength", "got NaN"),
    api("api-budget-batch", "width=2048, height=2048, batch_size=2", {"width": 2048, "height": 2048, "batch_size": 2},
        "ParamError", "batch_size", BUDGET_HINT),
    api("api-prompt-binary", "prompt=b'\\x00\\xff' (bytes)", {"prompt": {"hex": "00ff"}}, "ParamError", "prompt",
        "must be a string"),
    api("api-prompt-surrogate", "prompt='\\ud800' (unpaired surrogate)", {"prompt": "cat \ud800"}, "ParamError",
        "prompt", "unpaired surrogate"),
    api("api-negative-huge", f"negative_prompt of {MAX_PROMPT_CHARS + 1} characters", {"negative_prompt": LONG},
        "ParamError", "negative_prompt", "must be at most"),
    api("api-prompt-negative-when", "prompt '[a:b:-1]'", {"prompt": "[a:b:-1]"}, "ParamError", "prompt", "-1"),
    api("api-prompt-bad-weight", "prompt '(x:1.2.3)'", {"prompt": "(x:1.2.3)"}, "ParamError", "prompt",
        "is not a number"),
    api("api-sampler-unknown", "sampler_name='nope'", {"sampler_name": "nope"}, "ParamError", "sampler_name", "nope"),
    api("api-scheduler-unknown", "scheduler='nope'", {"scheduler": "nope"}, "ParamError", "scheduler", "nope"),
    api("api-model-unknown", "model='nosuch' in the models folder", {"model": "nosuch", "models_dir": "{models}"},
        "CheckpointError", None, "'nosuch' not found"),
    api("api-model-not-checkpoint", "model='{outside}/secret.txt' (a text file)", {"model": "{outside}/secret.txt"},
        "CheckpointError", None, "secret.txt: not a checkpoint"),
    api("api-model-dotdot", "model='../../../../../../etc/hostname' (relative path out of the folder)",
        {"model": "../../../../../../etc/hostname", "models_dir": "{models}"}, "CheckpointError", None,
        "etc/hostname"),  # read and refused as "not a checkpoint" (the library takes paths), never loaded
    load("api-ckpt-zero-byte", "load_model(zero.ckpt) (0 bytes)", "{models}/zero.ckpt", "CheckpointError",
         "zero.ckpt: not a readable checkpoint"),
    load("api-safetensors-truncated", "load_model(truncated.safetensors) (half a file)",
         "{models}/truncated.safetensors", "CheckpointError", "truncated or corrupt"),
    load("api-safetensors-corrupt", "load_model(corrupt-header.safetensors)", "{models}/corrupt-header.safetensors",
         "CheckpointError", "not a valid safetensors file"),
    load("api-ckpt-truncated", "load_model(truncated.ckpt) (half a zip)", "{models}/truncated.ckpt",
         "CheckpointError", "truncated.ckpt"),
    load("api-ckpt-random", "load_model(random.ckpt) (random bytes)", "{models}/random.ckpt", "CheckpointError",
         "random.ckpt: not a"),
    load("api-ckpt-pickle-code", "load_model(evil.ckpt) (zip pickle runs os.system)", "{models}/evil.ckpt",
         "CheckpointError", "it was NOT executed"),
    load("api-ckpt-pickle-code-legacy", "load_model(evil-legacy.ckpt) (legacy pickle runs os.system)",
         "{models}/evil-legacy.ckpt", "CheckpointError", "it was NOT executed"),
    # -- HTTP: 4xx with a JSON message naming the field ----------------------------------------------------------
    http("http-json-malformed", "body '{\"steps\": '", None, 422, "body", "malformed JSON", content='{"steps": '),
    http("http-json-not-object", "body '[1, 2]'", [1, 2], 422, "body", "valid dictionary"),
    http("http-json-surrogate", "body with JSON escape \\ud800 (unpaired surrogate)", None, 422, "prompt",
         "must be valid Unicode text", content='{"prompt": "\\ud800"}'),
    http("http-steps-type", "steps='many'", {"steps": "many"}, 422, "steps", "valid integer"),
    http("http-steps-range", "steps=0", {"steps": 0}, 422, "steps", "must be in [1, 1000], got 0"),
    http("http-seed-huge", "seed=2**70", {"seed": 2**70}, 422, "seed", "must be -1 (random) or in"),
    http("http-width-fraction", "width=64.5", {"width": 64.5}, 422, "width", "fractional part"),
    http("http-cfg-range", "cfg_scale=-1", {"cfg_scale": -1}, 422, "cfg_scale", "must be in [0, 100], got -1"),
    http("http-nested-body", "prompt as a 500-deep nested list", {"prompt": deeply_nested(500)}, 422, "prompt",
         "valid string"),
    http("http-budget-pixels", "width=height=4096", {"width": 4096, "height": 4096}, 422, "width", BUDGET_HINT),
    http("http-budget-batch", "2048x2048, batch_size=2", {"width": 2048, "height": 2048, "batch_size": 2}, 422,
         "batch_size", BUDGET_HINT),
    http("http-prompt-huge", f"prompt of {MAX_PROMPT_CHARS + 1} characters", {"prompt": LONG}, 422, "prompt",
         "must be at most"),
    http("http-prompt-not-editing", "prompt '[cat:dog:soon]' (accepted as literal text, as A1111; a warning in info)",
         {**SMALL, "prompt": "[cat:dog:soon]"}, 200, None, "[cat:dog:soon]\nSteps: 2"),
    http("http-prompt-deep", "prompt with 3000 nested '['", {**SMALL, "prompt": "[" * 3000 + "x" + "]" * 3000}, 200,
         None, "Steps: 2"),
    http("http-prompt-deep-round", "prompt with 3000 nested '('", {"prompt": "(" * 3000 + "x" + ")" * 3000}, 422,
         "prompt", "after nesting; at most 1000"),
    http("http-prompt-empty", "prompt '' (accepted)", {**SMALL, "prompt": ""}, 200, None, "Steps: 2, Sampler: Euler"),
    http("http-prompt-unicode", "prompt 'ein Kreis 円 🐱 \\u202e' (accepted)", {**SMALL, "prompt": "ein Kreis 円 🐱 \u202e"},
         200, None, "ein Kreis 円 🐱 \u202e"),
    http("http-prompt-control", "prompt with NUL and control characters (accepted)",
         {**SMALL, "prompt": "a\x00b\x07c\x1b[31m"}, 200, None, "a\x00b\x07c\x1b[31m"),
    http("http-sampler-unknown", "sampler_name='nope'", {"sampler_name": "nope"}, 422, "sampler_name", "nope"),
    http("http-scheduler-unknown", "scheduler='nope'", {"scheduler": "nope"}, 422, "scheduler", "nope"),
    http("http-model-unknown", "sd_model_checkpoint 'nosuch'", model_override("nosuch"), 422, "sd_model_checkpoint",
         "unknown model 'nosuch'"),
    http("http-model-dotdot", "sd_model_checkpoint '../outside/valid'", model_override("../outside/valid"), 422,
         "sd_model_checkpoint", "unknown model '../outside/valid'"),
    http("http-model-absolute", "sd_model_checkpoint '{outside}/valid.safetensors' (absolute path)",
         model_override("{outside}/valid.safetensors"), 422, "sd_model_checkpoint", "unknown model"),
    http("http-model-nul", "sd_model_checkpoint 'a\\x00b'", model_override("a\x00b"), 422, "sd_model_checkpoint",
         "unknown model"),
    http("http-model-symlink-out", "sd_model_checkpoint 'link-out' (symlink to a checkpoint outside)",
         model_override("link-out"), 422, "sd_model_checkpoint", "unknown model 'link-out'"),
    http("http-model-zero-byte", "sd_model_checkpoint 'empty.safetensors' (0 bytes)", model_override("empty.safetensors"), 422,
         "sd_model_checkpoint", "not a valid safetensors file"),
    http("http-model-truncated", "sd_model_checkpoint 'truncated.safetensors' (half a file)", model_override("truncated.safetensors"),
         422, "sd_model_checkpoint", "truncated or corrupt"),
    http("http-model-pickle-code", "sd_model_checkpoint 'evil' (pickle runs os.system)", model_override("evil"), 422,
         "sd_model_checkpoint", "it was NOT executed"),
    http("http-options-model-path", "POST /sdapi/v1/options sd_model_checkpoint '/etc/passwd'",
         {"sd_model_checkpoint": "/etc/passwd"}, 422, "sd_model_checkpoint", "unknown model '/etc/passwd'",
         path="/sdapi/v1/options"),
    http("http-outputs-dotdot", "GET /difusi/v1/outputs/..%2f..%2foutside/secret.txt", None, 404, "path",
         "no output file", method="GET", path="/difusi/v1/outputs/..%2f..%2foutside/secret.txt"),
    http("http-outputs-absolute", "GET /difusi/v1/outputs/%2fetc%2fpasswd", None, 404, "path", "no output file",
         method="GET", path="/difusi/v1/outputs/%2fetc%2fpasswd"),
    http("http-outputs-symlink", "GET /difusi/v1/outputs/leak.png (symlink to a file outside)", None, 404, "path",
         "no output file 'leak.png'", method="GET", path="/difusi/v1/outputs/leak.png"),
    http("http-pnginfo-binary", "png-info of random bytes", {"image": "3q2+7w" * 100}, 422, "image",
         "not a readable image", path="/sdapi/v1/png-info"),
    http("http-pnginfo-bomb", "png-info of a 30000x30000 PNG (decompression bomb)", {"image": "{bomb}"}, 422, "image",
         "too large to decode", path="/sdapi/v1/png-info"),
    http("http-history-limit", "GET /difusi/v1/history?limit=0", None, 422, "limit", "must be in [1, 1000]",
         method="GET", path="/difusi/v1/history", params={"limit": 0}),
    http("http-job-unknown", "GET /difusi/v1/jobs/does-not-exist", None, 404, "job_id", "no job with id",
         method="GET", path="/difusi/v1/jobs/does-not-exist"),
]


assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"
