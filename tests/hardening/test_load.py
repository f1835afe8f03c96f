"""A bounded load test on loopback: 50 concurrent clients, mixed valid and invalid requests, some interrupts.

Real server (uvicorn, difusi-mini, the bounded queue, SQLite history). Every answer must belong to its own
request (seeds, prompt, infotext of each PNG), no job may be lost or run twice, every saved image has exactly
one history row, and the server's memory must not grow from one round to the next.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from hardening_harness import serve
from PIL import Image

CLIENTS = 50
REQUESTS_PER_CLIENT = 3
INVALID = [  # (body change, field named in the 422)
    ({"steps": 0}, "steps"),
    ({"sampler_name": "no such sampler"}, "sampler_name"),
    ({"width": 4096, "height": 4096}, "width"),
    ({"prompt": "[a:b:-1]"}, "prompt"),  # ("[a:b:soon]" is literal text since issue 19, as in A1111)
]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Tally:
    ok: int = 0
    invalid: int = 0
    busy: int = 0
    interrupted: int = 0
    saved: list[tuple[str, int]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts) -> None:
        with self.lock:
            for name, value in counts.items():
                if isinstance(value, list):
                    getattr(self, name).extend(value)
                else:
                    setattr(self, name, getattr(self, name) + value)


def check_own_answer(body: dict, data: dict) -> list[str]:
    """What is wrong with a 200 answer to `body` (empty when it is this request's answer)."""
    info = json.loads(data["info"])
    count = body.get("batch_size", 1) * body.get("n_iter", 1)
    expected_seeds = list(range(body["seed"], body["seed"] + count))
    problems = []
    if info["all_seeds"] != expected_seeds or info["prompt"] != body["prompt"] or len(data["images"]) != count:
        problems.append(f"answer for {body['prompt']!r} has seeds {info['all_seeds']} and prompt {info['prompt']!r}")
    for b64, infotext, seed in zip(data["images"], info["infotexts"], expected_seeds, strict=False):
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        if image.info.get("parameters") != infotext or not infotext.startswith(body["prompt"] + "\n") \
                or f"Seed: {seed}," not in infotext or f"Steps: {body['steps']}," not in infotext:
            problems.append(f"image of {body['prompt']!r} carries {infotext[:80]!r}")
    return problems


def client_run(url: str, client_id: int, round_id: int, tally: Tally) -> None:
    with httpx.Client(base_url=url, timeout=300) as http:
        for request_id in range(REQUESTS_PER_CLIENT):
            kind = (client_id + request_id) % 5
            seed = 100_000 * round_id + 1000 * client_id + 10 * request_id
            prompt = f"load r{round_id} c{client_id} q{request_id}"
            body = {"prompt": prompt, "seed": seed, "steps": 2 + client_id % 3, "sampler_name": "Euler a",
                    "width": 64, "height": 64, "batch_size": 1 + request_id % 2}
            if kind == 4:  # invalid
                change, wanted = INVALID[(client_id + round_id) % len(INVALID)]
                response = http.post("/sdapi/v1/txt2img", json={**body, **change})
                if response.status_code == 422 and response.json()["field"] == wanted:
                    tally.add(invalid=1)
                else:
                    tally.add(problems=[f"invalid {change} answered {response.status_code} {response.text[:200]}"])
            elif kind == 3 and request_id == 0:  # a long job of our own, then interrupt it
                submitted = http.post("/difusi/v1/jobs", json={**body, "steps": 200, "n_iter": 5, "save_images": False})
                if submitted.status_code == 503:
                    tally.add(busy=1)
                    continue
                job_id = submitted.json()["id"]
                tally.add(job_ids=[job_id])
                time.sleep(0.05)
                http.delete(f"/difusi/v1/jobs/{job_id}")
                deadline = time.time() + 240
                while (status := http.get(f"/difusi/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                    if time.time() > deadline:
                        tally.add(problems=[f"interrupted job {job_id} never finished"])
                        break
                    time.sleep(0.05)
                if status["status"] in ("interrupted", "cancelled") and status["images_done"] < 5:
                    tally.add(interrupted=1)
                else:
                    tally.add(problems=[f"job {job_id} ended {status['status']} with {status['images_done']} images"])
            else:  # valid, saved
                response = http.post("/sdapi/v1/txt2img", json=body)
                if response.status_code == 503:
                    if response.json().get("error") != "QueueFull":
                        tally.add(problems=[f"503 without QueueFull: {response.text[:200]}"])
                    tally.add(busy=1)
                    continue
                if response.status_code != 200:
                    tally.add(problems=[f"valid request answered {response.status_code}: {response.text[:200]}"])
                    continue
                problems = check_own_answer(body, response.json())
                seeds = json.loads(response.json()["info"])["all_seeds"]
                tally.add(ok=1, problems=problems, saved=[(prompt, s) for s in seeds])


def run_round(url: str, round_id: int) -> tuple[Tally, float]:
    tally = Tally()
    started = time.perf_counter()
    threads = [threading.Thread(target=client_run, args=(url, i, round_id, tally)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    return tally, time.perf_counter() - started


@pytest.fixture()
def load_server(bad_files, tmp_path):
    with serve(bad_files, outputs_dir=tmp_path / "outputs") as url:
        yield url, tmp_path / "outputs"


def test_fifty_concurrent_clients(load_server, capsys):
    url, outputs = load_server
    with httpx.Client(base_url=url, timeout=120) as http:  # warm-up: model loaded, allocator pools filled
        for seed in range(3):
            assert http.post("/sdapi/v1/txt2img", json={"prompt": "warm", "seed": seed, "steps": 2, "batch_size": 2,
                                                       "save_images": False}).status_code == 200
    tallies, rss = [], [rss_bytes()]
    for round_id in (1, 2):
        tally, seconds = run_round(url, round_id)
        tallies.append((tally, seconds))
        rss.append(rss_bytes())
    with httpx.Client(base_url=url, timeout=120) as http:
        history = http.get("/difusi/v1/history", params={"limit": 1000}).json()["items"]
    saved = Counter((item["prompt"], item["seed"]) for item in history if item["prompt"].startswith("load r"))

    with capsys.disabled():
        for round_id, (tally, seconds) in enumerate(tallies, 1):
            print(f"\nload round {round_id}: {CLIENTS} clients, {CLIENTS * REQUESTS_PER_CLIENT} requests in "
                  f"{seconds:.1f} s: {tally.ok} generated ({len(tally.saved)} images), {tally.invalid} refused (422), "
                  f"{tally.busy} queue full (503), {tally.interrupted} interrupted")
        print(f"RSS after warm-up {rss[0] / 2**20:.0f} MiB, after round 1 {rss[1] / 2**20:.0f} MiB, "
              f"after round 2 {rss[2] / 2**20:.0f} MiB")
    for tally, _ in tallies:
        assert tally.problems == []
        total = tally.ok + tally.invalid + tally.busy + tally.interrupted
        assert total == CLIENTS * REQUESTS_PER_CLIENT  # every request got exactly one kind of answer
        assert tally.ok > CLIENTS and tally.invalid >= 10 and tally.interrupted >= 1
        assert len(set(tally.job_ids)) == len(tally.job_ids)
    answered = [pair for tally, _ in tallies for pair in tally.saved]
    assert len(set(answered)) == len(answered)  # no image answered twice
    assert sorted(saved) == sorted(answered) and max(saved.values()) == 1  # each in the history once, none lost
    # Memory is stable: the second round (same work) adds almost nothing over the first.
    assert rss[2] - rss[1] < 64 * 2**20, rss
    assert rss[2] - rss[0] < 256 * 2**20, rss
