"""``edgelora serve`` under load: concurrent clients with different adapters, adapter loading by path.

The server runs as ``edgelora serve`` in its own process (so the clients' Python does not share
its interpreter); the clients stream greedy completions over HTTP with httpx. On one bundle
(the random-weight 1B-shape model by default) with four random rank-16 PEFT adapters on all linear
layers (``bench_lora.make_random_adapter``), in one run:

* one client: requests one after another (adapter ``a0``): time to first token, decode tok/s
  (tokens after the first over the time after it), throughput (generated tokens over wall time);
* ``--clients`` (16) concurrent clients, each with adapter ``a{i % 4}``: aggregate throughput
  (all generated tokens over the wall time of the whole wave) against one client's, each
  request's decode tok/s, p50/p99 time to first token, errors;
* adapter load by path through the API: ``POST /v1/adapters`` then ``DELETE`` (median of 5; the
  round trip and the server's own load time);
* switching per request: one client, requests with the base only, with ``a0`` only, and with a
  different adapter each request (``a0..a3`` in turn): decode tok/s of each.

    python bench/bench_serve.py --models llama-3.2-1b --json bench/results/serve.json
    python bench/bench_serve.py --bundle /path/to/bundle --json bench/results/serve.json
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import parse_args, write_report  # noqa: E402

QUESTION = "Tell me a long story about a dragon who learns to bake bread, with many details."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, adapters: dict, threads: int | None, max_batch: int, context: int):
    port = _free_port()
    cmd = [sys.executable, "-m", "edgelora", "serve", str(bundle), "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "256", "--max-context", str(context), "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)


def stream_one(url: str, model: str, max_tokens: int) -> dict:
    """One streamed greedy completion (a text prompt: a random-weight bundle has no chat template):
    its start, first token and end times, tokens, error."""
    import httpx
    body = {"model": model, "prompt": QUESTION, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, error = None, 0, None
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
            if r.status_code != 200:
                r.read()
                return {"start": t0, "end": time.perf_counter(), "error": f"{r.status_code} {r.text[:200]}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    error = ev["error"]["message"]
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                elif ev.get("choices") and ev["choices"][0]["text"] and first is None:
                    first = time.perf_counter()
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    out = {"start": t0, "first": first, "end": end, "tokens": tokens, "error": error}
    out["ttft"] = None if first is None else first - t0
    out["decode_tps"] = (tokens - 1) / (end - first) if first is not None and tokens > 1 and end > first else None
    return out


def percentile(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def wave(url: str, models: list, max_tokens: int) -> dict:
    """``len(models)`` clients at once, one request each."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        rows = list(pool.map(lambda m: stream_one(url, m, max_tokens), models))
    wall = time.perf_counter() - t0
    ok = [r for r in rows if not r["error"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"clients": len(models), "requests": len(rows), "errors": len(rows) - len(ok),
            "error_messages": sorted({r["error"] for r in rows if r["error"]})[:5],
            "generated_tokens": sum(r["tokens"] for r in ok), "wall_seconds": wall,
            "throughput_tokens_per_second": sum(r["tokens"] for r in ok) / wall,
            "decode_tokens_per_second_per_request_median": statistics.median(
                [r["decode_tps"] for r in ok if r["decode_tps"]] or [0.0]),
            "ttft_seconds_p50": percentile(ttfts, 50) if ttfts else None,
            "ttft_seconds_p99": percentile(ttfts, 99) if ttfts else None}


def sequential(url: str, models: list, max_tokens: int) -> dict:
    """One client, one request after another."""
    t0 = time.perf_counter()
    rows = [stream_one(url, m, max_tokens) for m in models]
    wall = time.perf_counter() - t0
    ok = [r for r in rows if not r["error"]]
    return {"requests": len(rows), "errors": len(rows) - len(ok), "generated_tokens": sum(r["tokens"] for r in ok),
            "wall_seconds": wall, "throughput_tokens_per_second": sum(r["tokens"] for r in ok) / wall,
            "decode_tokens_per_second": statistics.median([r["decode_tps"] for r in ok if r["decode_tps"]] or [0.0]),
            "ttft_seconds_median": statistics.median([r["ttft"] for r in ok if r["ttft"] is not None] or [0.0])}


def adapter_loading(url: str, path: Path, n: int = 5) -> dict:
    import httpx
    trips, loads = [], []
    for i in range(n):
        t = time.perf_counter()
        r = httpx.post(url + "/v1/adapters", json={"name": f"probe{i}", "path": str(path)}, timeout=600)
        trips.append((time.perf_counter() - t) * 1e3)
        if r.status_code != 200:
            raise SystemExit(f"adapter load failed: {r.text}")
        loads.append(r.json()["load_ms"])
        httpx.delete(url + f"/v1/adapters/probe{i}", timeout=60).raise_for_status()
    return {"api_round_trip_ms_median": statistics.median(trips), "server_load_ms_median": statistics.median(loads),
            "api_round_trip_ms_all": trips}


def run(bundle: Path, work: Path, clients: int, max_tokens: int, threads: int | None, max_batch: int,
        context: int, rank: int, single_requests: int) -> dict:
    from bench_lora import make_random_adapter
    names = [f"a{i}" for i in range(4)]
    paths = {n: make_random_adapter(work / f"adapter-r{rank}-{n}", bundle, r=rank, seed=i) for i, n in enumerate(names)}
    proc, url = start_server(bundle, paths, threads, max_batch, context)
    try:
        for n in ["base", *names]:  # warm every path (kernels are compiled at load; this is the first batch)
            stream_one(url, n, 4)
        wave(url, [names[i % 4] for i in range(min(clients, max_batch))], 4)
        one = sequential(url, ["a0"] * single_requests, max_tokens)
        many = wave(url, [names[i % 4] for i in range(clients)], max_tokens)
        loading = adapter_loading(url, paths["a0"])
        base = sequential(url, ["base"] * 4, max_tokens)
        same = sequential(url, ["a0"] * 4, max_tokens)
        switching = sequential(url, names, max_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {"clients": clients, "max_tokens": max_tokens, "max_batch": max_batch, "threads": threads,
            "rank": rank, "one_client": one, "concurrent": many,
            "aggregate_vs_one_client": many["throughput_tokens_per_second"] / one["throughput_tokens_per_second"],
            "adapter_load": loading,
            "switch_per_request": {"base_decode_tokens_per_second": base["decode_tokens_per_second"],
                                   "same_adapter_decode_tokens_per_second": same["decode_tokens_per_second"],
                                   "switching_adapters_decode_tokens_per_second": switching["decode_tokens_per_second"],
                                   "switching_vs_same_adapter": switching["decode_tokens_per_second"]
                                   / same["decode_tokens_per_second"]}}


def main():
    def add(p):
        p.add_argument("--bundle", type=Path, default=None, help="an existing bundle (instead of --models)")
        p.add_argument("--clients", type=int, default=16,
                       help="concurrent clients, each with one of the four adapters in turn")
        p.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates")
        p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
        p.add_argument("--context", type=int, default=256, help="the server's --max-context")
        p.add_argument("--threads", type=int, default=None,
                       help="the server's --threads (default %(default)s: the server's own, every core)")
        p.add_argument("--rank", type=int, default=16, help="rank of the four random adapters")
        p.add_argument("--single-requests", type=int, default=2,
                       help="requests of the one-client run, one after another")

    a, work = parse_args(__doc__, ["llama-3.2-1b"], add)
    bundles = {}
    if a.bundle is not None:
        bundles[a.bundle.name] = a.bundle
    else:
        from bench_runtime import prepare
        for name in a.models:
            bundles[name] = prepare(name, work)[1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {"cores": os.cpu_count(), "load_average_at_start": load, "models": {}}
    for name, bundle in bundles.items():
        o = run(bundle, work, a.clients, a.max_tokens, a.threads, a.max_batch, a.context, a.rank, a.single_requests)
        report["models"][name] = o
        c, s = o["concurrent"], o["one_client"]
        print(f"\n{name}: {o['clients']} clients, 4 rank-{o['rank']} adapters, {o['max_tokens']} tokens each, greedy")
        print("| one client tok/s | 16 clients tok/s (aggregate) | ratio | TTFT p50 / p99 s | errors "
              "| load by path ms (API / server) | decode tok/s: base / same adapter / switching each request |")
        print("|---|---|---|---|---|---|---|")
        sw = o["switch_per_request"]
        print(f"| {s['throughput_tokens_per_second']:.2f} | {c['throughput_tokens_per_second']:.2f} | "
              f"{o['aggregate_vs_one_client']:.2f} | {c['ttft_seconds_p50']:.2f} / {c['ttft_seconds_p99']:.2f} | "
              f"{c['errors']} | {o['adapter_load']['api_round_trip_ms_median']:.1f} / "
              f"{o['adapter_load']['server_load_ms_median']:.1f} | {sw['base_decode_tokens_per_second']:.2f} / "
              f"{sw['same_adapter_decode_tokens_per_second']:.2f} / "
              f"{sw['switching_adapters_decode_tokens_per_second']:.2f} |")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
