#!/usr/bin/env python3
"""PyTorch full-attention decode peer for the shadowkv benchmarks.

A Llama-shaped bf16 decoder written plainly in PyTorch: fused qkv and gate_up
matrices, RMSNorm, RoPE (rotate-half, Hugging Face layout, llama3 scaling), SwiGLU,
lm_head and greedy argmax on the device. Weights are random (the cost of a decode
step does not depend on the values). Decode only: the static KV cache of every layer,
[batch, kv_heads, context + gen, head_dim], starts filled (with random values) for the
first `context` positions, and step s feeds one token per sequence at position
context + s. Attention is scaled_dot_product_attention(enable_gqa=True) over the valid
prefix cache[:, :, :context + s + 1] only, so shapes change every step: one CUDA graph
is captured per step, all graphs sharing one memory pool.

    python3 tools/peers/torch_decode.py --arch llama-3.1-8b --context 122880 --batch 7
    python3 tools/peers/torch_decode.py --arch llama-3.1-8b --context 61440 --batch auto --json
    python3 tools/peers/torch_decode.py --arch smollm2-135m --context 64 --batch 2 \\
        --gen 4 --device cpu          # smoke test without a GPU

Progress goes to stderr; results to stdout (a table, or with --json one JSON object
on the last line).
"""

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HBM_BYTES_PER_S = 4.3e12  # H200 copy bandwidth measured in DESIGN.md section 5
GIB = 1 << 30
BF16 = 2  # bytes

ARCHS = {
    "llama-3.1-8b": dict(
        hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
        intermediate=14336, vocab=128256, rms_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tied=False),
    "smollm2-135m": dict(
        hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
        intermediate=1536, vocab=49152, rms_eps=1e-5, rope_theta=100000.0,
        rope_scaling=None, tied=True),
}


def log(msg):
    print(f"[torch_decode] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- shapes


def weight_bytes(a, batch):
    """Bytes of weights one decode step reads: every layer matrix and norm, the final
    norm, lm_head, and the `batch` embedding rows gathered (the embedding table is
    read whole only when tied to lm_head, where lm_head already counts it)."""
    h, d, i = a["hidden"], a["head_dim"], a["intermediate"]
    qkv = h * (a["heads"] + 2 * a["kv_heads"]) * d
    o = a["heads"] * d * h
    per_layer = qkv + o + h * 2 * i + i * h + 2 * h
    total = a["layers"] * per_layer + h + a["vocab"] * h + batch * h
    return total * BF16


def kv_bytes_per_token(a):
    """K and V bytes of one token over all layers."""
    return a["layers"] * 2 * a["kv_heads"] * a["head_dim"] * BF16


def param_bytes(a):
    """Bytes the weights occupy in memory."""
    emb = a["vocab"] * a["hidden"] * BF16
    return weight_bytes(a, 0) + (0 if a["tied"] else emb)


def activation_bytes_per_seq(a):
    """Rough upper bound of the per-sequence activations of one step (the graphs
    share one pool, so this exists once, not once per graph)."""
    return (8 * a["hidden"] + 2 * (a["heads"] + 2 * a["kv_heads"]) * a["head_dim"]
            + 4 * a["intermediate"]) * BF16 * 2 + a["vocab"] * (BF16 + 4 + 8)


def free_memory(device):
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


def auto_batch(a, context, gen, device, headroom):
    free = free_memory(device)
    per_seq = kv_bytes_per_token(a) * (context + gen) + activation_bytes_per_seq(a)
    avail = free - param_bytes(a) - headroom
    batch = int(avail // per_seq) if avail > 0 else 0
    log(f"auto batch: free {free / GIB:.2f} GiB, weights {param_bytes(a) / GIB:.2f} GiB, "
        f"KV+act per sequence {per_seq / GIB:.3f} GiB, headroom {headroom / GIB:.1f} GiB "
        f"-> batch {batch}")
    if batch < 1:
        sys.exit("torch_decode: not even one sequence fits in free memory")
    return batch


# --------------------------------------------------------------------------- model


def rope_inv_freq(a):
    d = a["head_dim"]
    inv = 1.0 / (a["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = a["rope_scaling"]
    if s is None:
        return inv
    # Llama 3 frequency scaling (as Hugging Face's _compute_llama3_parameters).
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(a, positions, device):
    """cos, sin [len(positions), head_dim] in bf16 (rotate-half layout)."""
    inv = rope_inv_freq(a)
    pos = torch.tensor(positions, dtype=torch.float64)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos().to(torch.bfloat16).to(device),
            emb.sin().to(torch.bfloat16).to(device))


def rand_weight(shape, fan_in, device):
    # Uniform with standard deviation 1/sqrt(fan_in): bound sqrt(3/fan_in).
    bound = math.sqrt(3.0 / fan_in)
    return torch.empty(shape, dtype=torch.bfloat16, device=device).uniform_(-bound, bound)


class Layer:
    def __init__(self, a, device):
        h, d, i = a["hidden"], a["head_dim"], a["intermediate"]
        self.ln1 = torch.ones(h, dtype=torch.bfloat16, device=device)
        self.ln2 = torch.ones(h, dtype=torch.bfloat16, device=device)
        self.qkv = rand_weight(((a["heads"] + 2 * a["kv_heads"]) * d, h), h, device)
        self.o = rand_weight((h, a["heads"] * d), a["heads"] * d, device)
        self.gate_up = rand_weight((2 * i, h), h, device)  # [gate; up]
        self.down = rand_weight((h, i), i, device)


def rms_norm(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Decoder:
    def __init__(self, a, batch, context, gen, device):
        self.a, self.batch, self.context, self.gen = a, batch, context, gen
        self.device = device
        h, v = a["hidden"], a["vocab"]
        log(f"allocating weights ({param_bytes(a) / GIB:.2f} GiB)")
        self.embed = rand_weight((v, h), 1.0, device)  # std 1
        self.layers = [Layer(a, device) for _ in range(a["layers"])]
        self.norm = torch.ones(h, dtype=torch.bfloat16, device=device)
        self.lm_head = self.embed if a["tied"] else rand_weight((v, h), h, device)

        total = context + gen
        kv_gib = kv_bytes_per_token(a) * total * batch / GIB
        log(f"allocating KV cache: {a['layers']} layers x [{batch}, {a['kv_heads']}, "
            f"{total}, {a['head_dim']}] x 2 ({kv_gib:.2f} GiB)")
        shape = (batch, a["kv_heads"], total, a["head_dim"])
        self.k_cache, self.v_cache = [], []
        for li in range(a["layers"]):
            k = torch.empty(shape, dtype=torch.bfloat16, device=device)
            v_ = torch.empty(shape, dtype=torch.bfloat16, device=device)
            # In-place fill, one sequence at a time: no temporaries beyond the cache.
            if context > 0:
                for b in range(batch):
                    k[b, :, :context].normal_()
                    v_[b, :, :context].normal_()
            self.k_cache.append(k)
            self.v_cache.append(v_)
            if (li + 1) % 8 == 0 or li + 1 == a["layers"]:
                log(f"  KV cache layer {li + 1}/{a['layers']}")

        # Static tensors the graphs read and write.
        self.cos, self.sin = rope_tables(a, range(context, context + gen), device)
        self.tok0 = torch.randint(0, v, (batch,), device=device)
        self.tok = self.tok0.clone()
        self.out_tokens = torch.zeros((gen, batch), dtype=torch.long, device=device)

    def step(self, s):
        """Decode step s: one token per sequence at position context + s. Reads self.tok,
        writes the argmax token back into self.tok and self.out_tokens[s]. Keeps no
        reference to any intermediate tensor."""
        a = self.a
        B, H, KV, D = self.batch, a["heads"], a["kv_heads"], a["head_dim"]
        eps = a["rms_eps"]
        pos = self.context + s
        cur = pos + 1
        cos, sin = self.cos[s], self.sin[s]  # [D], broadcast over [B, heads, 1, D]

        x = F.embedding(self.tok, self.embed)  # [B, hidden]
        for li, L in enumerate(self.layers):
            hn = rms_norm(x, L.ln1, eps)
            qkv = F.linear(hn, L.qkv)
            q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
            q = q.view(B, H, 1, D)
            k = k.view(B, KV, 1, D)
            v = v.view(B, KV, 1, D)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[:, :, pos:pos + 1].copy_(k)
            vc[:, :, pos:pos + 1].copy_(v)
            o = F.scaled_dot_product_attention(
                q, kc[:, :, :cur], vc[:, :, :cur], enable_gqa=True)
            x = x + F.linear(o.reshape(B, H * D), L.o)
            hn = rms_norm(x, L.ln2, eps)
            gate, up = F.linear(hn, L.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, L.down)
        x = rms_norm(x, self.norm, eps)
        nxt = F.linear(x, self.lm_head).argmax(dim=-1)
        self.tok.copy_(nxt)
        self.out_tokens[s].copy_(nxt)


# --------------------------------------------------------------------------- timing


def run_cuda(dec, args):
    dev = dec.device
    gen = dec.gen
    graphs = None
    if not args.no_graph:
        cap_stream = torch.cuda.Stream(device=dev)
        cap_stream.wait_stream(torch.cuda.current_stream(dev))
        log("eager warm-up on the capture stream (first and last positions)")
        with torch.cuda.stream(cap_stream):
            for s in sorted({0, gen - 1}):
                for _ in range(2):
                    dec.step(s)
        torch.cuda.current_stream(dev).wait_stream(cap_stream)
        torch.cuda.synchronize(dev)

        pool = torch.cuda.graph_pool_handle()
        graphs = []
        t0 = time.perf_counter()
        for s in range(gen):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=cap_stream):
                dec.step(s)
            graphs.append(g)
            if (s + 1) % 10 == 0 or s + 1 == gen:
                log(f"captured {s + 1}/{gen} graphs "
                    f"({time.perf_counter() - t0:.1f} s, "
                    f"allocated {torch.cuda.memory_allocated(dev) / GIB:.2f} GiB, "
                    f"reserved {torch.cuda.memory_reserved(dev) / GIB:.2f} GiB)")

        def launch(s):
            graphs[s].replay()
    else:
        def launch(s):
            dec.step(s)

    log(f"warm-up: {args.warmup} step(s)")
    dec.tok.copy_(dec.tok0)
    for w in range(args.warmup):
        launch(w % gen)
    torch.cuda.synchronize(dev)

    log(f"timing {gen} step(s)")
    dec.tok.copy_(dec.tok0)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(gen)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(gen)]
    for s in range(gen):
        starts[s].record()
        launch(s)
        ends[s].record()
    torch.cuda.synchronize(dev)
    step_ms = [starts[s].elapsed_time(ends[s]) for s in range(gen)]
    total_s = starts[0].elapsed_time(ends[-1]) / 1e3
    peak = torch.cuda.max_memory_allocated(dev)

    del graphs
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    return step_ms, total_s, peak


def run_cpu(dec, args):
    gen = dec.gen
    log(f"warm-up: {args.warmup} step(s) (eager; CUDA graphs need a GPU)")
    for w in range(args.warmup):
        dec.step(w % gen)
    dec.tok.copy_(dec.tok0)
    log(f"timing {gen} step(s)")
    step_ms = []
    t0 = time.perf_counter()
    for s in range(gen):
        t = time.perf_counter()
        dec.step(s)
        step_ms.append((time.perf_counter() - t) * 1e3)
    total_s = time.perf_counter() - t0
    return step_ms, total_s, 0


# --------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    p.add_argument("--context", type=int, default=61440,
                   help="tokens already in the KV cache (default 61440)")
    p.add_argument("--batch", default="1", help="sequences, or 'auto' (default 1)")
    p.add_argument("--gen", type=int, default=100, help="decode steps timed (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (default 5)")
    p.add_argument("--no-graph", action="store_true", help="eager steps, no CUDA graphs")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on the last line of stdout")
    p.add_argument("--headroom-gib", type=float, default=6.0,
                   help="memory left free by --batch auto (default 6)")
    p.add_argument("--layers", type=int, default=None,
                   help="override the layer count (quick tests only)")
    p.add_argument("--sdpa", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"],
                   help="restrict SDPA to one backend (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.gen < 1 or args.context < 0 or args.warmup < 0:
        p.error("--gen must be >= 1, --context and --warmup >= 0")
    a = dict(ARCHS[args.arch])
    if args.layers is not None:
        a["layers"] = args.layers

    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("torch_decode: CUDA is not available (use --device cpu for a smoke test)")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.init()
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        device_name = platform.processor() or platform.machine() or "cpu"
        if not args.no_graph:
            log("CUDA graphs need a GPU: running eager on cpu")
            args.no_graph = True
    torch.manual_seed(args.seed)

    if args.batch == "auto":
        batch = auto_batch(a, args.context, args.gen, device, int(args.headroom_gib * GIB))
    else:
        batch = int(args.batch)
        if batch < 1:
            p.error("--batch must be >= 1 or 'auto'")
        need = (param_bytes(a) + batch * kv_bytes_per_token(a) * (args.context + args.gen))
        free = free_memory(device)
        if need > free:
            log(f"warning: weights + KV need {need / GIB:.2f} GiB, "
                f"only {free / GIB:.2f} GiB free")

    log(f"{args.arch}: batch {batch}, context {args.context}, gen {args.gen}, "
        f"{'eager' if args.no_graph else 'one CUDA graph per step'}, SDPA {args.sdpa}, torch {torch.__version__}, "
        f"{device_name}")

    if args.sdpa == "auto":
        sdpa_ctx = contextlib.nullcontext()
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa_ctx = sdpa_kernel({
            "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[args.sdpa])

    with torch.inference_mode(), sdpa_ctx:
        dec = Decoder(a, batch, args.context, args.gen, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            step_ms, total_s, peak = run_cuda(dec, args)
        else:
            step_ms, total_s, peak = run_cpu(dec, args)

    # HBM bytes per step, averaged over the timed steps (the KV read grows by one token
    # per step, so the mean is the middle step's): weights + KV read + KV written.
    kv_tok = kv_bytes_per_token(a)
    mean_len = args.context + (args.gen + 1) / 2.0  # cur_len = context + s + 1
    bytes_per_step = int(round(weight_bytes(a, batch) + batch * kv_tok * mean_len
                               + batch * kv_tok))
    median = statistics.median(step_ms)
    mean = statistics.fmean(step_ms)
    bound_ms = bytes_per_step / HBM_BYTES_PER_S * 1e3
    result = {
        "peer": "torch",
        "arch": args.arch,
        "context": args.context,
        "batch": batch,
        "gen": args.gen,
        "graph": not args.no_graph,
        "step_ms_median": round(median, 4),
        "step_ms_mean": round(mean, 4),
        "tokens_per_s": round(batch * args.gen / total_s, 2),
        "bytes_per_step": bytes_per_step,
        "hbm_bound_ratio": round(median / bound_ms, 4),
        "peak_mem_gib": round(peak / GIB, 3),
        "torch": torch.__version__,
        "device_name": device_name,
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        rows = [
            ("arch", args.arch), ("context", args.context), ("batch", batch),
            ("gen (steps timed)", args.gen),
            ("mode", "eager" if args.no_graph else "CUDA graph per step"),
            ("step ms median", f"{median:.3f}"), ("step ms mean", f"{mean:.3f}"),
            ("tokens/s", f"{result['tokens_per_s']:.1f}"),
            ("bytes/step", f"{bytes_per_step / 1e9:.3f} GB"),
            ("HBM bound (4.3 TB/s)", f"{bound_ms:.3f} ms"),
            ("step / HBM bound", f"{result['hbm_bound_ratio']:.3f}x"),
            ("peak memory", f"{result['peak_mem_gib']:.2f} GiB"),
            ("torch", torch.__version__), ("device", device_name),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
