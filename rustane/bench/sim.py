"""Simulator benchmark of the fused kernel set at Stories110M shapes.

    python -m rustane.bench sim [--json] [--repeats N] [--seq S]    (bench/sim.py: same)

For every kernel of the plan (plus qBwd/kvBwd from a GQA variant, 12 q-heads over 4 kv-heads,
so all ten kernels are timed): the eval time on the sim backend in fp16 and fp32, and the same
op sequence written directly in numpy (views for reshape/transpose/slice, fp32 compute, rounding
to fp16 after every op in fp16 mode, fp16 I/O in both) — the interpreter overhead is
``interp / direct − 1``. Also the evals per layer per step of the MHA and GQA plans.
Times are the minimum over repeats, sim and direct measured alternately (the machine is shared;
the minimum is the least noisy).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from rustane import backends
from rustane import kernels as K

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
STORIES = dict(dim=768, hidden_dim=2048, n_heads=12, n_kv_heads=12, head_dim=64, seq_len=256, rope_theta=1e4,
               residual_alpha=1 / np.sqrt(24))


class Ops:
    """The sim's dtype policy, written directly: compute in fp32, store in ``dt``."""

    def __init__(self, precision: str):
        self.dt = F16 if precision == "fp16" else F32

    def st(self, a):
        return a.astype(self.dt, copy=False)

    def mm(self, a, b):
        return self.st(np.matmul(a.astype(F32, copy=False), b.astype(F32, copy=False)))

    def add(self, a, b):
        return self.st(np.add(a, b, dtype=F32))

    def sub(self, a, b):
        return self.st(np.subtract(a, b, dtype=F32))

    def mul(self, a, b):
        return self.st(np.multiply(a, b, dtype=F32))

    def sigmoid(self, a):
        # the overflow-free form the simulator uses: σ(x) = (x ≥ 0 ? 1 : e) / (1 + e), e = exp(−|x|)
        a = a.astype(F32, copy=False)
        e = np.exp(-np.abs(a))
        return self.st(np.where(a >= 0, F32.type(1), e) / (1 + e))

    def softmax(self, a):
        s = a.astype(F32)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        return self.st(s / s.sum(axis=-1, keepdims=True))

    def rowsum(self, a):
        return self.st(np.add.reduce(a, axis=-1, keepdims=True, dtype=F32))

    def cat(self, parts, axis=0):
        return np.concatenate(parts, axis=axis).astype(self.dt, copy=False)


def _consts(shape: K.KernelShape, o: Ops):
    cos, sin = K.rope_tables(shape.seq_len, shape.head_dim, shape.rope_theta)
    return dict(cos=cos.astype(F16).astype(o.dt), sin=sin.astype(F16).astype(o.dt),
                mask=K.causal_mask(shape.seq_len).astype(o.dt),
                scale=o.dt.type(K.attention_scale(shape.head_dim)), alpha=o.dt.type(np.float16(shape.residual_alpha)),
                neg1=o.dt.type(-1.0), one=o.dt.type(1.0))


def _lin(o, act, w):
    """The §4.1 dynamic matmul: act [IC, S], staged w [IC, OC] -> [OC, S]."""
    return o.mm(act.T, w).T


def _heads(a, n, hd, s):
    """[n·hd, S] -> [n, S, hd] (reshape + transpose view)."""
    return a.reshape(n, hd, s).transpose(0, 2, 1)


def _rope(o, xh, c):
    n, s, hd = xh.shape
    p = xh.reshape(n, s * hd // 2, 2)
    rot = o.cat([o.mul(p[..., 1:2], c["neg1"]), p[..., 0:1]], axis=2).reshape(n, s, hd)
    return o.add(o.mul(xh, c["cos"]), o.mul(rot, c["sin"]))


def direct(name: str, spec: K.KernelSpec, shape: K.KernelShape, o: Ops, c: dict, x: np.ndarray) -> np.ndarray:
    """Kernel ``name`` as direct numpy calls on the packed input ``x`` [C, W] (fp16)."""
    x = x.astype(o.dt, copy=False)
    S, NH, NKV, HD = shape.seq_len, shape.n_heads, shape.n_kv_heads, shape.head_dim
    R, QD, KVD = shape.gqa_ratio, shape.q_dim, shape.kv_dim
    b = {blk.name: x[blk.c0:blk.c1, blk.col0:blk.col1] for blk in spec.blocks}
    if name == "sdpaFwd":
        q = _heads(_lin(o, b["xn"], b["wq"]), NH, HD, S)
        k = _heads(_lin(o, b["xn"], b["wk"]), NKV, HD, S)
        v = _lin(o, b["xn"], b["wv"])
        qr, kr = _rope(o, q, c), _rope(o, k, c)
        sc = o.mm(qr.reshape(NKV, R * S, HD), kr.transpose(0, 2, 1)).reshape(NH, S, S)
        p = o.softmax(o.add(o.mul(sc, c["scale"]), c["mask"]))
        a = o.mm(p.reshape(NKV, R * S, S), _heads(v, NKV, HD, S)).reshape(NH, S, HD).transpose(0, 2, 1).reshape(QD, S)
        x2 = o.add(b["x"], o.mul(o.mm(b["wo"], a), c["alpha"]))
        out = o.cat([x2, a, qr.transpose(0, 2, 1).reshape(QD, S), kr.transpose(0, 2, 1).reshape(KVD, S), v])
    elif name == "ffnFused":
        h1, h3 = _lin(o, b["x2n"], b["w1"]), _lin(o, b["x2n"], b["w3"])
        gate = o.mul(o.mul(h1, o.sigmoid(h1)), h3)
        out = o.cat([o.add(b["x2"], o.mul(o.mm(b["w2"], gate), c["alpha"])), h1, h3, gate])
    elif name in ("ffnBwdW2t", "wotBwd", "qBwd"):
        act, w = (blk.name for blk in spec.blocks)
        out = _lin(o, b[act], b[w])
    elif name == "ffnBwdW13t":
        sig = o.sigmoid(b["h1"])
        dh3 = o.mul(b["dgate"], o.mul(b["h1"], sig))
        dsilu = o.mul(sig, o.add(o.mul(b["h1"], o.sub(c["one"], sig)), c["one"]))
        dh1 = o.mul(o.mul(b["dgate"], b["h3"]), dsilu)
        dx = o.add(o.mm(dh1.T, b["w1"]), o.mm(dh3.T, b["w3"])).T
        out = o.cat([dx, dh1, dh3])
    elif name == "kvBwd":
        out = o.add(o.mm(b["dk"].T, b["wk"]), o.mm(b["dv"].T, b["wv"])).T
    elif name == "qkvBwd":
        out = o.add(o.add(o.mm(b["dq"].T, b["wq"]), o.mm(b["dk"].T, b["wk"])), o.mm(b["dv"].T, b["wv"])).T
    elif name == "sdpaBwd1":
        qg = _heads(b["q_rope"], NH, HD, S).reshape(NKV, R * S, HD)
        dag = _heads(b["da"], NH, HD, S).reshape(NKV, R * S, HD)
        kh, vh = _heads(b["k_rope"], NKV, HD, S), _heads(b["v"], NKV, HD, S)
        sc = o.mm(qg, kh.transpose(0, 2, 1)).reshape(NH, S, S)
        p = o.softmax(o.add(o.mul(sc, c["scale"]), c["mask"]))
        dv = o.mm(p.reshape(NKV, R * S, S).transpose(0, 2, 1), dag).transpose(0, 2, 1).reshape(KVD, S)
        dp = o.mm(dag, vh.transpose(0, 2, 1))
        out = o.cat([dv, p.reshape(NH * S, S), dp.reshape(NH * S, S)])
    elif name == "sdpaBwd2":
        p, dp = b["P"].reshape(NH, S, S), b["dP"].reshape(NH, S, S)
        ds = o.mul(o.mul(p, o.sub(dp, o.rowsum(o.mul(p, dp)))), c["scale"]).reshape(NKV, R * S, S)
        qg = _heads(b["q_rope"], NH, HD, S).reshape(NKV, R * S, HD)
        kh = _heads(b["k_rope"], NKV, HD, S)
        dq = o.mm(ds, kh).reshape(NH, S, HD).transpose(0, 2, 1).reshape(QD, S)
        dk = o.mm(ds.transpose(0, 2, 1), qg).transpose(0, 2, 1).reshape(KVD, S)
        out = o.cat([dq, dk])
    else:
        raise KeyError(name)
    return out.astype(F16)


def _best_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Min time of ``fa`` and of ``fb``, measured alternately so load spikes hit both alike."""
    fa(), fb()  # warm-up (first touch of scratch buffers, BLAS threads)
    ba = bb = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ba, bb = min(ba, t1 - t0), min(bb, t2 - t1)
    return ba, bb


def _inputs(spec: K.KernelSpec, shape: K.KernelShape, rng) -> np.ndarray:
    arrays = {b.name: rng.standard_normal(b.source_shape).astype(np.float32) * (0.05 if b.kind == "weight" else 1.0)
              for b in spec.blocks}
    if spec.name == "sdpaBwd2":  # realistic P rows (a causal softmax) and moderate dP
        from_scores = rng.standard_normal((shape.n_heads, shape.seq_len, shape.seq_len)) + K.causal_mask(shape.seq_len)
        e = np.exp(from_scores - from_scores.max(-1, keepdims=True))
        arrays["P"] = (e / e.sum(-1, keepdims=True)).reshape(-1, shape.seq_len)
        arrays["dP"] *= 0.1
    return K.pack_input(spec, arrays)


def bench(repeats: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    mha = K.KernelShape(**{**STORIES, "seq_len": seq})
    gqa = K.KernelShape(**{**STORIES, "seq_len": seq, "n_kv_heads": 4})
    jobs = [(mha, n) for n in K.plan_for(mha)] + [(gqa, "qBwd"), (gqa, "kvBwd")]
    result: dict = {"shape": {**STORIES, "seq_len": seq}, "gqa_variant_for": ["qBwd", "kvBwd"], "gqa_n_kv_heads": 4,
                    "repeats": repeats, "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
                    "kernels": {}}
    for shape, name in jobs:
        spec = K.plan_for(shape)[name]
        x = _inputs(spec, shape, rng)
        row = {"in_shape": list(spec.in_shape), "out_shape": list(spec.out_shape)}
        for prec in ("fp16", "fp32"):
            kern = K.compile_spec(backends.get("sim", precision=prec), spec)
            inb, outb = kern.alloc(kern.inputs[0]), kern.alloc(kern.outputs[0])
            inb.write(x)
            req = kern.request([inb], [outb])
            o, c = Ops(prec), _consts(shape, Ops(prec))
            t_interp, t_direct = _best_pair(req.eval, lambda: direct(name, spec, shape, o, c, x), repeats)
            ref = direct(name, spec, shape, o, c, x).astype(np.float32)
            got = outb.read().astype(np.float32)
            row[prec] = {
                "interp_ms": round(t_interp * 1e3, 3),
                "direct_numpy_ms": round(t_direct * 1e3, 3),
                "overhead": round(t_interp / t_direct - 1.0, 4),
                # sanity: the direct reproduction computes the same numbers
                "max_rel_diff_vs_direct": float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)),
            }
        result["kernels"][name] = row
    for prec in ("fp16", "fp32"):
        ti = sum(r[prec]["interp_ms"] for r in result["kernels"].values())
        td = sum(r[prec]["direct_numpy_ms"] for r in result["kernels"].values())
        result[f"total_{prec}"] = {"interp_ms": round(ti, 3), "direct_numpy_ms": round(td, 3),
                                   "overhead": round(ti / td - 1.0, 4)}
    result["evals_per_layer"] = {"mha": K.evals_per_layer(mha), "gqa": K.evals_per_layer(gqa)}
    result["kernels_per_layer"] = {"mha": list(K.plan_for(mha)), "gqa": list(K.plan_for(gqa))}
    return result


HELP = "per-kernel simulator eval time at Stories110M shapes, interpreter overhead vs direct numpy"


def add_arguments(ap) -> None:
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (min is reported)")
    ap.add_argument("--seq", type=int, default=256, help="sequence length (Stories110M: 256)")



def run(args) -> int:
    if args.repeats < 1 or args.seq < 1:
        raise ValueError("--repeats and --seq must be >= 1")
    res = bench(args.repeats, args.seq)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"Stories110M kernels, seq {args.seq}, min of {args.repeats} (ms)")
    print(f"{'kernel':12} {'fp16 sim':>9} {'direct':>9} {'ovh':>7} {'fp32 sim':>9} {'direct':>9} {'ovh':>7}")
    for name, r in res["kernels"].items():
        a, b = r["fp16"], r["fp32"]
        print(f"{name:12} {a['interp_ms']:9.2f} {a['direct_numpy_ms']:9.2f} {a['overhead']:7.1%} "
              f"{b['interp_ms']:9.2f} {b['direct_numpy_ms']:9.2f} {b['overhead']:7.1%}")
    for prec in ("fp16", "fp32"):
        t = res[f"total_{prec}"]
        print(f"total {prec}: sim {t['interp_ms']:.1f} ms, direct {t['direct_numpy_ms']:.1f} ms, overhead {t['overhead']:.1%}")
    print(f"evals per layer per step: MHA {res['evals_per_layer']['mha']}, GQA {res['evals_per_layer']['gqa']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
