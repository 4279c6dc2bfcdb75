"""Head to head with llama.cpp on the same CPU, the same random checkpoint, in one run.

llama.cpp is what users run instead of edgelora on a CPU, so its numbers are the bar. This script
(benchmarks only: never an install or CI dependency)

1. finds llama.cpp's tools in the user's cache, or with ``--build`` builds them there from the tree
   vendored in the llama-cpp-python sdist on PyPI (CPU only, native; ~18 minutes on 2 cores);
2. makes a random checkpoint of a real model's shape (``make_random_model.py``), converts it to an
   edgelora bundle (default float16 head, and ``--embeddings nf4 --head nf4``, every 2-D tensor in
   NF4 as llama.cpp's ``--pure`` quantizations have every one in their type), and writes the same weights as
   an F16 GGUF, quantized by llama.cpp's own ``llama-quantize`` to IQ4_NL (a 16-value non-uniform
   codebook like NF4) and Q4_0 (``--pure``; ``--llama-types`` picks them), and with ``--default-mix`` to IQ4_NL as llama.cpp
   quantizes by default (its head in a 6-bit type: the like of edgelora's default head);
3. writes one random rank-16 all-linear PEFT adapter, and the same adapter as a llama.cpp LoRA GGUF
   (float32; with ``--float16-adapter`` also both rounded to float16, as ``edgelora deploy`` writes it;
   edgelora's default load rounds the float32 file's to float16 too, and ``--float32-held-adapter``
   adds it held in float32, ``adapter_dtype="float32"``);
4. runs both systems interleaved, ``--repeats`` rounds, each measurement in a fresh process (its
   peak RSS is its own): prefill of 128 and 512 tokens, decode (``--decode-tokens``, 128), decode
   with the adapter (edgelora's adapter process also decodes without it, interleaved, so the
   adapter's own cost is a ratio from one process); with ``--depths``, decode after that many
   tokens of context too (``llama-bench -d``; edgelora after a prompt as long): a chat's decode,
   where attention reads the cache; medians are reported, with every round kept in the JSON;
5. reports the weight bytes a decode step reads in each system (edgelora's ``bytes_per_token``:
   the int8 path's tiles and head codes; llama.cpp's GGUF tensors but the rows of the embedding a
   step does not look up), the GB/s each decode reaches, and the *bytes bound*: the decode ratio
   at which both would read at the same GB/s (a system's ratio above it reads faster).

    python bench/bench_llamacpp.py --build --models tinyllama-1.1b --workdir /tmp/h2h \\
        --json bench/results/llamacpp.json

llama.cpp's decode (``llama-bench`` tg128) starts from an empty context and edgelora's after an
8-token prompt; with an adapter both decode as many tokens after the same short prompt
(``llama-completion --lora``, its ``eval time`` line). llama.cpp's threads busy-wait, so any other
load on the machine hurts it more than edgelora: run this on a quiet machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from bench_common import parse_args, write_report

HERE = Path(__file__).resolve().parent
SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e57098
TOOLS = ("llama-bench", "llama-quantize", "llama-completion")


# ---------------------------------------------------------------------------------------------
# llama.cpp: found in the cache or built there
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgelora-bench" / "llama.cpp-0.3.36"


def find_llama_cpp(given: Path | None) -> Path | None:
    """The folder holding llama.cpp's tools: ``given``, else the cache's build."""
    for d in ([given] if given else []) + [cache_dir() / "build" / "bin"]:
        if d is not None and all((d / t).is_file() for t in TOOLS):
            return d
    return None


def build_llama_cpp() -> Path:
    """Download the sdist with pip, build the tools in the cache; return their folder."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        dl = root / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(dl)], check=True)
        archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tf:
            top = tf.getnames()[0].split("/")[0]
            tf.extractall(root / "unpacked", filter="data")
        if src.exists():
            shutil.rmtree(src)
        (root / "unpacked" / top / "vendor" / "llama.cpp").rename(src)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DGGML_BLAS=OFF",
             "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"]
    if "amx_tile" in Path("/proc/cpuinfo").read_text():  # its AMX kernels crashed in these VMs
        flags += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), *flags], check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), f"-j{os.cpu_count()}", "--target", *TOOLS], check=True)
    return root / "build" / "bin"


# ---------------------------------------------------------------------------------------------
# the same weights for llama.cpp
# ---------------------------------------------------------------------------------------------

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (pairs of halves interleaved per head), as its
    converter writes them (the inverse of converters/gguf.py's ``_unpermute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def vocab(vocab_size: int) -> tuple[list, list]:
    """A SentencePiece-style vocabulary for the random model's ids: the three specials, the 256
    byte tokens (llama.cpp's tokenizer falls back to them, so any prompt encodes) and word tokens."""
    import gguf
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581w{i}" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.NORMAL] * (vocab_size - len(types))
    return tokens, types


def _vocab(gguf, w, vocab_size: int) -> None:
    tokens, types = vocab(vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab_size)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def _finish(w, tmp: Path, out: Path) -> Path:
    """Write the GGUF ``w`` was filling to ``tmp``, then move it to ``out`` (complete or absent)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def write_gguf_f16(src: Path, out: Path) -> Path:
    """``src`` (a Hugging Face Llama folder) as an F16 GGUF, laid out as llama.cpp's converter does."""
    import gguf
    from edgelora.safetensors_io import SafetensorsFile
    if out.exists():
        return out
    cfg = json.loads((src / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // n_head
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("random " + src.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    _vocab(gguf, w, cfg["vocab_size"])
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":  # llama.cpp divides each rotary frequency by its rope_freqs factor
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     llama3_rope_factors(scaling, cfg.get("rope_theta", 10000.0), head_dim))
    elif scaling:
        raise SystemExit(f"{src.name}: rope scaling {scaling.get('rope_type')!r} is not written here")
    with SafetensorsFile(src / "model.safetensors") as f:  # a tied head: llama.cpp reuses token_embd
        for name in f.keys():
            a = f.float32(name)
            if name.endswith("q_proj.weight"):
                a = _permute(a, n_head)
            elif name.endswith("k_proj.weight"):
                a = _permute(a, n_kv)
            new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            w.add_tensor(new, a if a.ndim <= 1 else a.astype(np.float16))  # norms stay F32, as the converter
    return _finish(w, tmp, out)


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """float32 [head_dim / 2]: the factor each rotary frequency of Llama 3's rope scaling is divided
    by (1 for short wavelengths, ``factor`` for long ones, a smooth blend between), what
    transformers' ``_compute_llama3_parameters`` applies and llama.cpp reads as ``rope_freqs``."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    out = 1.0 / ((1 - smooth) / factor + smooth)  # 1 where wavelen < old / high, factor where > old / low
    return out.astype(np.float32)


def write_lora_gguf(adapter: Path, cfg: dict, out: Path, dtype=np.float32) -> Path:
    """A PEFT adapter folder as llama.cpp's LoRA GGUF (``convert_lora_to_gguf.py``'s layout:
    ``<tensor>.lora_a`` [r, in] and ``.lora_b`` [out, r], q/k B rows permuted as the base's), its
    tensors in ``dtype`` (float32, that converter's default ``--outtype f32``; or float16)."""
    import gguf
    from edgelora.safetensors_io import SafetensorsFile
    if out.exists():
        return out
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(acfg["lora_alpha"]))
    with SafetensorsFile(adapter / "adapter_model.safetensors") as f:
        tensors = {name: f.float32(name) for name in sorted(f.keys())}
    for name, a in tensors.items():
        m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight$", name)
        module, which = m.group(1), m.group(2)
        if which == "B" and module.endswith("q_proj"):
            a = _permute(a, cfg["num_attention_heads"])
        elif which == "B" and module.endswith("k_proj"):
            a = _permute(a, cfg["num_key_value_heads"])
        base = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        w.add_tensor(f"{base}.lora_{which.lower()}", a.astype(dtype))
    return _finish(w, tmp, out)


# ---------------------------------------------------------------------------------------------
# measurements, each in a fresh process
# ---------------------------------------------------------------------------------------------

def _popen_rss(cmd: list, env=None) -> tuple[str, int]:
    """Run ``cmd``; its output (standard output and error) and its own peak RSS in bytes: its
    ``VmHWM``, read from ``/proc`` while it runs (``wait4``'s ``ru_maxrss`` would report this large
    parent's peak instead: Linux carries it across ``exec``)."""
    import threading
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(p.stdout.read()))
    reader.start()
    peak = 0
    status = Path(f"/proc/{p.pid}/status")
    while p.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    reader.join()
    out = b"".join(chunks).decode("utf-8", "replace")
    if p.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({p.returncode}):\n{out[-3000:]}")
    return out, peak


def llama_bench(bin_dir: Path, gguf_path: Path, threads: int, n: int) -> dict:
    out, rss = _popen_rss([str(bin_dir / "llama-bench"), "-m", str(gguf_path), "-t", str(threads),
                           "-p", "128,512", "-n", str(n), "-r", "3", "-o", "json"])
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    res = {"peak_rss_bytes": rss}
    for r in rows:
        key = f"prefill_{r['n_prompt']}" if r["n_prompt"] else "decode"  # (tg<n>: decode from an empty context)
        res[key] = r["avg_ts"]
    return res


def llama_bench_depth(bin_dir: Path, gguf_path: Path, threads: int, n: int, depth: int) -> float:
    """llama.cpp's decode tok/s of ``n`` tokens after ``depth`` tokens of context (``llama-bench -d``)."""
    out, _ = _popen_rss([str(bin_dir / "llama-bench"), "-m", str(gguf_path), "-t", str(threads), "-p", "0",
                         "-n", str(n), "-d", str(depth), "-r", "3", "-o", "json"])
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    return next(r["avg_ts"] for r in rows if r["n_gen"])


def gguf_bytes_per_token(path: Path) -> int:
    """Weight bytes one llama.cpp decode step reads from a GGUF: every tensor but the token
    embedding, of which a step reads one row, unless the model has no ``output.weight`` (a tied
    head: then the embedding is the head, read whole)."""
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


def llama_lora_decode(bin_dir: Path, gguf_path: Path, lora: Path | None, threads: int, n: int) -> dict:
    prompt = " ".join(f"w{i}" for i in range(100, 108))
    cmd = [str(bin_dir / "llama-completion"), "-m", str(gguf_path), "-t", str(threads), "-c", "1024", "-n", str(n),
           "--ignore-eos", "--temp", "0", "-no-cnv", "--no-display-prompt", "-p", prompt]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    out, rss = _popen_rss(cmd)
    m = re.search(r"eval time =\s*[\d.]+ ms /\s*(\d+) runs.*?([\d.]+) tokens per second", out.split("prompt eval time")[-1])
    return {"decode": float(m.group(2)), "peak_rss_bytes": rss}


EDGELORA_CHILD = r"""
import json, statistics, sys
import numpy as np
import edgelora
from edgelora.benchmark import bytes_per_token
from edgelora.memory import peak_rss_bytes
path, threads, products, adapter, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
kw = {"adapter_dtype": sys.argv[6]} if len(sys.argv) > 6 else {}
model = edgelora.load(path, threads=threads, max_context=max(512, 8 + n) + 16, products=products, **kw)
model.eos_ids = set()
if adapter != "-":
    model.adapters.load("a", adapter)
name = "a" if adapter != "-" else None
prompt = np.random.default_rng(0).integers(3, model.args.vocab_size, 512).tolist()
model.generate(prompt, max_new_tokens=2, adapter=name)  # compile, fault in
res = {}
if adapter == "-":
    for T in (128, 512):
        runs = []
        for _ in range(3):
            model.generate(prompt[:T], max_new_tokens=1, adapter=name)
            runs.append(model.last_stats.prefill_tokens_per_second)
        res[f"prefill_{T}"] = statistics.median(runs)
runs, base = [], []
for _ in range(2 if adapter == "-" else 3):
    model.generate(prompt[:8], max_new_tokens=n, adapter=name)
    runs.append(model.last_stats.decode_tokens_per_second)
    if adapter != "-":  # the base in the same process, interleaved: the adapter's own cost
        model.generate(prompt[:8], max_new_tokens=n)
        base.append(model.last_stats.decode_tokens_per_second)
res["decode"] = statistics.median(runs)
if base:
    res["decode_base_same_process"] = statistics.median(base)
res["peak_rss_bytes"] = peak_rss_bytes()
res["bytes_per_token"] = bytes_per_token(model)
print(json.dumps(res))
"""


EDGELORA_DEPTH_CHILD = r"""
import json, statistics, sys
import numpy as np
import edgelora
path, threads, products, n, depth = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
kw = {"kv_cache": sys.argv[6]} if len(sys.argv) > 6 else {}
model = edgelora.load(path, threads=threads, max_context=depth + n + 16, products=products, **kw)
model.eos_ids = set()
prompt = np.random.default_rng(0).integers(3, model.args.vocab_size, depth).tolist()
model.generate(prompt[:8], max_new_tokens=2)  # compile, fault in
runs = []
for _ in range(2):
    model.generate(prompt, max_new_tokens=n)
    runs.append(model.last_stats.decode_tokens_per_second)
print(json.dumps({"decode": statistics.median(runs)}))
"""


def edgelora_depth(bundle: Path, threads: int, products: str, n: int, depth: int, kv_cache: str) -> float:
    """edgelora's decode tok/s of ``n`` tokens after a prompt of ``depth`` tokens (median of 2),
    its KV cache holding ``kv_cache``."""
    from edgelora.child import python_command
    out, _ = _popen_rss(python_command(EDGELORA_DEPTH_CHILD, str(bundle), str(threads), products, str(n), str(depth),
                                       kv_cache))
    return json.loads(out.strip().splitlines()[-1])["decode"]


def edgelora_run(bundle: Path, threads: int, products: str, adapter: Path | None, n: int,
                 adapter_dtype: str | None = None) -> dict:
    from edgelora.child import python_command
    out, rss = _popen_rss(python_command(EDGELORA_CHILD, str(bundle), str(threads), products,
                                         str(adapter) if adapter else "-", str(n),
                                         *([adapter_dtype] if adapter_dtype else [])))
    res = json.loads(out.strip().splitlines()[-1])  # (its peak_rss_bytes: its own VmHWM, as ``rss``)
    res["peak_rss_bytes"] = rss or res["peak_rss_bytes"]
    return res


def main():
    def add(p):
        p.add_argument("--build", action="store_true", help="build llama.cpp in the cache if it is not there")
        p.add_argument("--llama-cpp", type=Path, default=None,
                       help="folder holding llama-bench & co (default %(default)s: the build in the cache)")
        p.add_argument("--threads", type=int, default=2, help="threads of both systems")
        p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians reported)")
        p.add_argument("--decode-tokens", type=int, default=128,
                       help="tokens decoded by each system (llama-bench's tg<n>), with and without the adapter")
        p.add_argument("--products", nargs="+", default=["exact", "int8"],
                       help="edgelora product paths to run (exact, int8)")
        p.add_argument("--llama-types", nargs="+", default=["IQ4_NL", "Q4_0"], choices=["IQ4_NL", "Q4_0"],
                       help="llama.cpp's quantization types to run, each --pure (IQ4_NL is the one the targets and "
                            "the adapter rounds use; a build with -march=native on an AMX CPU runs Q4_0 and the default "
                            "mix's k-quants through its AMX tile kernels (the compiler's own AMX macros, whatever GGML_AMX_* say), "
                            "which stop with SIGILL where the kernel does not support AMX's tile data, as in the 2-vCPU "
                            "Xeon VMs here: ARCH_GET_XCOMP_SUPP lacks XTILEDATA)")
        p.add_argument("--default-mix", action="store_true",
                       help="also llama.cpp's own IQ4_NL mix (llama-quantize without --pure, which keeps the head in "
                            "a 6-bit type): the like of edgelora's default head (float16, int8 at load)")
        p.add_argument("--float16-adapter", action="store_true",
                       help="also the same adapter rounded to float16 (what `edgelora deploy` writes; edgelora "
                            "holds it in float16), for llama.cpp as a float16 LoRA GGUF (--outtype f16)")
        p.add_argument("--float32-held-adapter", action="store_true",
                       help="also edgelora with the float32 adapter held in float32 (adapter_dtype='float32', the "
                            "exact products' default; the int8 products round it to float16 by default)")
        p.add_argument("--depths", nargs="*", type=int, default=[],
                       help="also decode after this many tokens of context (default: none), llama.cpp "
                            "IQ4_NL against each product path's default bundle")
        p.add_argument("--kv-caches", nargs="+", default=["float16"], choices=["float32", "float16"],
                       help="edgelora's KV caches in the --depths rounds (float16: edgelora's default with int8 "
                            "products, and llama.cpp's)")
        p.add_argument("--depths-only", action="store_true",
                       help="run only the --depths rounds (no prefill, plain decode or adapter rounds)")

    a, work = parse_args(__doc__, ["tinyllama-1.1b"], add)
    if a.depths_only and not a.depths:
        raise SystemExit("--depths-only needs --depths")
    if "IQ4_NL" not in a.llama_types:
        raise SystemExit("--llama-types needs IQ4_NL: the targets, the adapter and the depth rounds compare against it")
    bin_dir = find_llama_cpp(a.llama_cpp)
    if bin_dir is None:
        if not a.build:
            raise SystemExit("llama.cpp's tools are not built: pass --build (about 18 minutes on 2 cores)")
        bin_dir = build_llama_cpp()
    sys.path.insert(0, str(HERE))
    from bench_lora import make_random_adapter
    from bench_runtime import prepare
    from edgelora.benchmark import memory_bandwidth
    report = {"cores": os.cpu_count(), "threads": a.threads, "llama_cpp": SDIST, "repeats": a.repeats,
              "bandwidth_bytes_per_second": memory_bandwidth(a.threads), "models": {}}
    for name in a.models:
        src, bundle = prepare(name, work)
        _, bundle_nf4 = prepare(name, work, embeddings="nf4", head="nf4")  # as llama.cpp's --pure: every 2-D tensor
        cfg = json.loads((src / "config.json").read_text())
        ggufs = {}
        # --pure: every 2-D tensor in that type, the head included; the default mix: llama.cpp's choice
        for q, pure in [(q, True) for q in a.llama_types] + ([("IQ4_NL", False)] if a.default_mix else []):
            dst = work / f"{name}-{q.lower()}{'' if pure else '-mix'}.gguf"
            if not dst.exists():
                f16 = write_gguf_f16(src, work / f"{name}-f16.gguf")
                subprocess.run([str(bin_dir / "llama-quantize")] + (["--pure"] if pure else []) + [str(f16), str(dst), q],
                               check=True, capture_output=True)
            ggufs[q if pure else f"{q} default mix"] = dst
        adapter = make_random_adapter(work / f"{name}-adapter-r16", bundle, r=16)
        lora = write_lora_gguf(adapter, cfg, work / f"{name}-lora-r16.gguf")
        systems = {f"llama.cpp {q}": ("llama", g) for q, g in ggufs.items()}
        for p in a.products:
            systems[f"edgelora {p}"] = ("edgelora", (bundle, p))
            systems[f"edgelora {p}, nf4 embeddings and head"] = ("edgelora", (bundle_nf4, p))
        rounds = {k: [] for k in systems}
        lora_rounds = {"llama.cpp IQ4_NL": [], "llama.cpp IQ4_NL, no adapter": []}
        lora_rounds.update({f"edgelora {p}": [] for p in a.products})
        lora_rounds.update({f"edgelora {p}, no adapter": [] for p in a.products})
        if a.float16_adapter:
            adapter16 = make_random_adapter(work / f"{name}-adapter-r16-float16", bundle, r=16, dtype=np.float16)
            lora16 = write_lora_gguf(adapter16, cfg, work / f"{name}-lora-r16-f16.gguf", np.float16)
            lora_rounds["llama.cpp IQ4_NL, float16 adapter"] = []
            lora_rounds.update({f"edgelora {p}, float16 adapter": [] for p in a.products})
        if a.float32_held_adapter:
            lora_rounds.update({f"edgelora {p}, float32 held adapter": [] for p in a.products})
        depth_rounds = {"llama.cpp IQ4_NL": {}}
        depth_rounds.update({f"edgelora {p}, {kv} KV cache": {} for p in a.products for kv in a.kv_caches})
        if a.depths_only:
            systems, rounds, lora_rounds = {}, {}, {}
        for r in range(a.repeats):  # interleaved rounds
            for k, (kind, what) in systems.items():
                t = time.perf_counter()
                if kind == "llama":
                    res = llama_bench(bin_dir, what, a.threads, a.decode_tokens)
                    res["bytes_per_token"] = gguf_bytes_per_token(what)
                else:
                    res = edgelora_run(what[0], a.threads, what[1], None, a.decode_tokens)
                res["wall_seconds"] = time.perf_counter() - t
                rounds[k].append(res)
                print(f"[{name} round {r + 1}] {k}: {res}", flush=True)
            for k in lora_rounds:
                half = k.endswith("float16 adapter")
                ad = None if k.endswith("no adapter") else adapter16 if half else adapter
                if k.startswith("llama.cpp"):
                    res = llama_lora_decode(bin_dir, ggufs["IQ4_NL"], None if ad is None else lora16 if half else lora,
                                            a.threads, a.decode_tokens)
                else:
                    res = edgelora_run(bundle, a.threads, k.split()[1].rstrip(","), ad, a.decode_tokens,
                                       "float32" if k.endswith("float32 held adapter") else None)
                lora_rounds[k].append(res)
                print(f"[{name} round {r + 1}] adapter {k}: {res}", flush=True)
            for d in a.depths:
                for k in depth_rounds:
                    tps = (llama_bench_depth(bin_dir, ggufs["IQ4_NL"], a.threads, a.decode_tokens, d)
                           if k.startswith("llama.cpp") else
                           edgelora_depth(bundle, a.threads, k.split()[1].rstrip(","), a.decode_tokens, d,
                                          k.split()[2]))
                    depth_rounds[k].setdefault(str(d), []).append(tps)
                    print(f"[{name} round {r + 1}] depth {d} {k}: decode {tps:.1f} tok/s", flush=True)
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0] if m != "wall_seconds"}
               for k, v in rounds.items()}
        lmed = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in lora_rounds.items()}
        report["models"][name] = {"median": med, "adapter_median": lmed, "rounds": rounds, "adapter_rounds": lora_rounds}
        if a.depths:
            report["models"][name]["depth_median"] = {k: {d: statistics.median(x) for d, x in v.items()}
                                                      for k, v in depth_rounds.items()}
            report["models"][name]["depth_rounds"] = depth_rounds
        print(f"\n{name}, {a.threads} threads, medians of {a.repeats} interleaved rounds")
        for d in a.depths:
            dm = report["models"][name]["depth_median"]
            ref_d = dm["llama.cpp IQ4_NL"][str(d)]
            print(f"after {d} tokens: " + ", ".join(f"{k} {v[str(d)]:.1f} tok/s ({v[str(d)] / ref_d:.2f}x)"
                                                    for k, v in dm.items()))
        if a.depths_only:
            continue
        ref = med["llama.cpp IQ4_NL"]
        print(f"{'system':38} {'prefill-128':>12} {'prefill-512':>12} {'decode':>8} {'peak RSS MB':>12} "
              f"{'MB a token':>10} {'GB/s':>5} {'bytes bound':>11}")
        for k, m in med.items():  # bytes bound: the decode ratio at which both would read at the same GB/s
            print(f"{k:38} {m['prefill_128']:8.1f} ({m['prefill_128'] / ref['prefill_128']:.2f}x) "
                  f"{m['prefill_512']:7.1f} ({m['prefill_512'] / ref['prefill_512']:.2f}x) "
                  f"{m['decode']:6.1f} ({m['decode'] / ref['decode']:.2f}x) {m['peak_rss_bytes'] / 1e6:10.0f} "
                  f"{m['bytes_per_token'] / 1e6:10.0f} {m['decode'] * m['bytes_per_token'] / 1e9:5.1f} "
                  f"{ref['bytes_per_token'] / m['bytes_per_token']:10.2f}x")
        for k, m in lmed.items():
            same = (f", base in the same process {m['decode_base_same_process']:.1f} "
                    f"({m['decode'] / m['decode_base_same_process']:.2f}x)") if "decode_base_same_process" in m else ""
            print(f"adapter: {k:38} decode {m['decode']:6.1f} tok/s{same}, peak RSS {m['peak_rss_bytes'] / 1e6:.0f} MB")
    write_report(a.json, report)


if __name__ == "__main__":
    main()
