"""Fine-tuning a pretrained model on the training kernels: LoRA adapters or full fine-tuning.

    from rustane.finetune_engine import FinetuneEngine
    from rustane.lora import LoraConfig
    eng = FinetuneEngine("model.gguf", lora=LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")),
                         backend="sim", precision="fp16", seq_len=256)
    data = eng.open_data("data/", mask_prompt=True)
    eng.fit(data, steps=100, out="adapters/")

What is kept (docs/finetune.md, "Memory"): the frozen base lives only in the kernels' staged
weight buffers (``rustane.lora_train``); embedding, norms and classifier stay fp32 on the CPU
(the CPU computes with them); gradients and AdamW moments exist for the trained tensors only.

Checkpoints (``out/checkpoints/step-N``) hold the trained tensors (PEFT adapter files for LoRA,
``trained.safetensors`` for full fine-tuning), ``optimizer.safetensors`` and
``trainer_state.json`` (step, data cursor, loss scaler, settings); the base model is read again
from its source on resume, so a resumed run is bit-identical to an unbroken one.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rustane import checkpoint, cpu_ops, models
from rustane.train_settings import StepStats, TrainConfig, make_backend
from rustane.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraConfig, init_adapters, load_adapter, save_adapter
from rustane.optim import AdamW, make_loss_scaler

log = logging.getLogger("rustane.finetune")
STATE_FILE, OPTIM_FILE, TRAINED_FILE = "trainer_state.json", "optimizer.safetensors", "trained.safetensors"
CHECKPOINTS = "checkpoints"
LORA_RING = 2

__all__ = ["FinetuneEngine", "FinetuneStats", "peak_rss_bytes", "latest_checkpoint", "run_job", "DEFAULTS"]

#: every setting of a fine-tuning job and its default (``python -m rustane.finetune``'s flags and
#: config keys, ``Engine.finetune``'s keyword arguments)
DEFAULTS = {
    "model": None, "data": None, "fine_tune_type": "lora", "lora_rank": 8, "lora_alpha": None, "lora_scale": None,
    "lora_layers": None, "lora_targets": "q_proj,v_proj", "mask_prompt": False, "steps": 100, "accum": 1,
    "batch_size": 1, "seq_len": None, "learning_rate": 1e-4, "min_lr": None, "warmup": 10, "weight_decay": 0.0,
    "clip": 1.0, "loss_scale": "dynamic", "save_every": 100, "eval_every": 50, "eval_batches": None,
    "adapter_path": "adapters", "resume": False, "freeze_embeddings": False, "fit": "pad", "truncate": False,
    "valid_fraction": 0.1, "backend": "auto", "precision": "fp16", "seed": 0, "research": False, "keep": 3,
    "progress": True, "debug": False,
}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


@dataclass
class FinetuneStats(StepStats):
    loss_tokens: int = 0  # tokens that carried loss in this step
    peak_rss: int = 0


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    d = Path(out) / CHECKPOINTS
    if not d.is_dir():
        return None
    steps = sorted(p for p in d.glob("step-*") if (p / STATE_FILE).is_file())
    return steps[-1] if steps else None


class FinetuneEngine:
    """A pretrained model, compiled for ``seq_len``, with the trained part chosen:
    ``lora`` (a ``LoraConfig``) trains adapters; ``lora=None`` is full fine-tuning
    (``freeze_embeddings``, ``layers``: the trained blocks)."""

    def __init__(self, src: str | os.PathLike, *, lora: LoraConfig | None = None, backend: str | Any = "auto",
                 precision: str = "fp16", seq_len: int | None = None, seed: int = 0,
                 train: TrainConfig | None = None, freeze_embeddings: bool = False,
                 layers: tuple[int, ...] | None = None, ane_rules: bool = True, adapters: dict | None = None,
                 imported=None):
        from rustane.formats import load_model, resolve_source

        self.src = str(src)
        m = imported if imported is not None else load_model(resolve_source(src))
        cfg = models.config_from_hf(m.config)
        limit = m.spec.max_position
        self.config = cfg = cfg.replace(seq_len=int(seq_len) if seq_len is not None else min(limit, 256))
        self.imported_meta = m  # tokenizer, eos ids, config (its tensors are dropped below)
        params = checkpoint.from_hf_params(m.tensors, cfg)
        m.tensors = {}  # the model's arrays now live only in ``params`` (and soon the kernels)
        self.precision = precision
        self.backend = make_backend(backend, precision, ane_rules) if isinstance(backend, str) else backend
        self.seed = int(seed)
        self.train_config = (train or TrainConfig()).validate()
        self.lora_config = lora
        self.freeze_embeddings = bool(freeze_embeddings)
        self.layers = None if layers is None else tuple(layers)
        from rustane.runtime.model import Model, return_freed_memory

        if lora is not None:
            # no layer matrix trains: the queue carries only the adapters' rank-r jobs, so the
            # backward's arrays live in a ring of LORA_RING layers (docs/finetune.md, "Memory")
            self.model = Model(cfg, self.backend, params, seed=self.seed, trainable=(), keep_frozen=False,
                               ring=LORA_RING)
            from rustane.lora_train import LoraTrainer
            self.lora = LoraTrainer(self.model, lora, adapters or init_adapters(cfg, lora, self.seed))
            trained = self.lora.params
        else:
            names = self._full_trainable(params)
            self.model = Model(cfg, self.backend, params, seed=self.seed, trainable=names, keep_frozen=False)
            self.lora = None
            trained = {k: self.model.params[k] for k in names}
        del params
        # the imported model's arrays are gone: hand their pages back before the first step
        # allocates (rustane.runtime.model.return_freed_memory)
        return_freed_memory()
        tc = self.train_config
        self.optimizer = AdamW(trained, betas=(tc.beta1, tc.beta2), eps=tc.eps, weight_decay=tc.weight_decay)
        self.scaler = make_loss_scaler(tc.loss_scale)
        self.schedule = tc.schedule()
        self.step = 0
        self.trained_tokens = 0
        self.sampler = None
        self.trainer_state: dict[str, Any] = {}

    def _full_trainable(self, params) -> list[str]:
        from rustane.models.llama import params as P
        names = []
        for k in params:
            if self.layers is not None:
                if not any(k.startswith(P.layer_prefix(i)) for i in self.layers):
                    continue
            if self.freeze_embeddings and k in (P.EMBED, P.HEAD):
                continue
            names.append(k)
        if not names:
            raise ValueError("nothing to train: --freeze-embeddings and the layer subset leave no parameter")
        return names

    # ---- data ---------------------------------------------------------------------------------

    def tokenization(self):
        from rustane.finetune_data import Tokenization
        return Tokenization.of_model(self.imported_meta)

    def open_data(self, path, **kw):
        from rustane.finetune_data import open_finetune_data
        return open_finetune_data(path, self.tokenization(), self.config.seq_len, **kw)

    # ---- steps --------------------------------------------------------------------------------

    @property
    def trained_params(self) -> dict[str, np.ndarray]:
        return self.optimizer.params

    def train_step(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> FinetuneStats:
        """One optimizer step over rows ``x, y, w`` ``[n, seq_len]``: the loss is the mean over
        the rows' loss-carrying tokens."""
        m, timer = self.model, self.model.timer
        timer.reset()
        t0 = time.perf_counter()
        n = float(w.sum())
        scale = self.scaler.scale
        loss = 0.0
        for i in range(len(x)):
            if w[i].any():
                loss += m.forward_backward(x[i], y[i], loss_scale=scale, weights=w[i] / n)
        lr = self.schedule(self.step)
        if self.lora is not None:
            info = self.lora.optimizer_step(self.optimizer, self.scaler, lr, max_norm=self.train_config.clip)
        else:
            info = m.optimizer_step(self.optimizer, self.scaler, lr, max_norm=self.train_config.clip)
        self.step += 1
        self.trained_tokens += int(n)
        return FinetuneStats(step=self.step, loss=loss, lr=lr, grad_norm=info.grad_norm, loss_scale=info.loss_scale,
                             skipped=not info.applied, tokens=x.size, seconds=time.perf_counter() - t0,
                             ms=timer.ms(), evals=timer.evals, loss_tokens=int(n), peak_rss=peak_rss_bytes())

    def evaluate(self, batches, max_batches: int | None = None) -> float:
        """Mean loss over the loss-carrying tokens of ``(x, y, w)`` batches (forward only)."""
        total, n = 0.0, 0.0
        for b, (x, y, w) in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            for i in range(len(x)):
                if not w[i].any():
                    continue
                logits = self.model.logits(x[i])
                s, _ = cpu_ops.cross_entropy_weighted(logits, y[i], w[i], 1.0, dlogits=logits)
                total += s
                n += float(w[i].sum())
        if n == 0:
            raise ValueError("evaluate: no validation tokens carry loss")
        return total / n

    # ---- saving -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        st = {"step": self.step, "seed": self.seed, "train": asdict(self.train_config), "src": self.src,
              "loss_scaler": self.scaler.state_dict(), "trained_tokens": self.trained_tokens,
              "precision": self.precision, "seq_len": self.config.seq_len,
              "fine_tune_type": "lora" if self.lora is not None else "full",
              "lora": None if self.lora_config is None else self.lora_config.to_peft(),
              "freeze_embeddings": self.freeze_embeddings, "layers": None if self.layers is None else list(self.layers)}
        if self.sampler is not None:
            st["data"] = self.sampler.state_dict()
        return st

    def save_trained(self, path: str | os.PathLike, extra: dict[str, Any] | None = None,
                     with_optimizer: bool = True) -> Path:
        """The trained tensors (+ optimizer and trainer state) as one atomic folder."""
        from safetensors.numpy import save_file
        self.model.finish_gradients()
        st = self.state()
        st.update(extra or {})
        files: dict[str, bytes] = {STATE_FILE: json.dumps(st, indent=2, allow_nan=False).encode()}
        with checkpoint.atomic_dir(path) as tmp:
            if self.lora is not None:
                save_adapter(tmp / "adapter", self.config, self.lora_config, self.lora.adapters, base=self.src)
                for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    os.replace(tmp / "adapter" / f, tmp / f)
                os.rmdir(tmp / "adapter")
            else:
                save_file({k: np.ascontiguousarray(v) for k, v in self.trained_params.items()},
                          str(tmp / TRAINED_FILE), metadata={"format": "pt"})
            if with_optimizer:
                meta = {"format": "pt", "rustane": json.dumps(self.optimizer.state_meta())}
                save_file({k: np.ascontiguousarray(v) for k, v in self.optimizer.state_tensors().items()},
                          str(tmp / OPTIM_FILE), metadata=meta)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        return Path(path)

    def save_outputs(self, out: str | os.PathLike) -> None:
        """The user-facing result in ``out``: PEFT adapter files (LoRA) or a HF model folder (full)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            # two files replaced one by one, each atomically (a reader sees old or new files)
            tmp = self.save_trained(out / ".adapter-tmp", with_optimizer=False)
            for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                os.replace(tmp / f, out / f)
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            self.export_hf(out / "model")

    def export_hf(self, out: str | os.PathLike) -> Path:
        """Full fine-tuning: the whole model as a HF folder (frozen tensors read again from the source)."""
        from rustane.formats import Imported, load_model, resolve_source
        from rustane.formats.hf import save_hf_folder
        self.model.finish_gradients()
        m = load_model(resolve_source(self.src))
        hf = checkpoint.to_hf_params(dict(self.model.params), self.config)
        m.tensors.update(hf)
        return save_hf_folder(Imported(config=m.config, tensors=m.tensors, tokenizer_json=m.tokenizer_json,
                                       tokenizer_config=m.tokenizer_config), out)

    def save_step(self, out: str | os.PathLike, keep: int | None = None) -> Path:
        p = self.save_trained(Path(out) / CHECKPOINTS / f"step-{self.step:08d}")
        self.save_outputs(out)
        if keep:
            old = sorted((Path(out) / CHECKPOINTS).glob("step-*"))[:-keep]
            import shutil
            for d in old:
                shutil.rmtree(d, ignore_errors=True)
        return p

    def load_trained(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore trained tensors, optimizer, scaler and counters from ``save_trained``'s folder."""
        from safetensors import safe_open
        from safetensors.numpy import load_file
        p = Path(path)
        st = json.loads((p / STATE_FILE).read_text())
        if self.lora is not None:
            lcfg, ad = load_adapter(p, self.config)
            if lcfg != self.lora_config:
                raise ValueError(f"{p}: the checkpoint's LoRA settings {lcfg} differ from this run's {self.lora_config}")
            for k, (a, b) in ad.items():
                a0, b0 = self.lora.adapters[k]
                a0[...] = a
                b0[...] = b
            self.lora.restage()
        else:
            t = load_file(str(p / TRAINED_FILE))
            for k, v in self.trained_params.items():
                v[...] = t[k]
            self.model.params_changed()
        with safe_open(str(p / OPTIM_FILE), "numpy") as f:
            meta = json.loads(f.metadata()["rustane"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.optimizer.load_state(tensors, meta)
        self.scaler.load_state_dict(st["loss_scaler"])
        self.step, self.trained_tokens = int(st["step"]), int(st.get("trained_tokens", 0))
        self.trainer_state = st
        return st

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self, data, steps: int | None = None, *, batch_size: int = 1, out: str | os.PathLike | None = None,
            save_every: int = 0, keep: int | None = None, eval_every: int = 0, eval_batches: int | None = None,
            on_step: Callable[[FinetuneStats], None] | None = None,
            on_eval: Callable[[int, float], None] | None = None) -> dict[str, Any]:
        """Train to ``steps`` optimizer steps of ``batch_size·accum`` rows; metrics to
        ``out/metrics.jsonl``, checkpoints every ``save_every`` steps and at the end."""
        total = self.train_config.steps if steps is None else int(steps)
        rows = batch_size * self.train_config.accum
        if data.seq_len != self.config.seq_len:
            raise ValueError(f"data seq_len {data.seq_len} != model seq_len {self.config.seq_len}")
        if self.sampler is None:
            self.sampler = data.sampler(self.seed)
            if "data" in self.trainer_state:
                self.sampler.load_state_dict(self.trainer_state["data"])
        out_dir = Path(out) if out is not None else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if out_dir is not None else None
        history, evals = [], []

        def record(obj):
            if metrics is not None:
                metrics.write(json.dumps(obj) + "\n")
                metrics.flush()

        def do_eval():
            if data.valid is None:
                return
            val = self.evaluate(data.batches("valid", batch_size), max_batches=eval_batches)
            evals.append((self.step, val))
            record({"step": self.step, "val_loss": val})
            if on_eval:
                on_eval(self.step, val)

        interrupted: list[bool] = []

        def on_sigint(signum, frame):
            if interrupted:
                raise KeyboardInterrupt
            interrupted.append(True)

        prev = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
        last_saved = None
        try:
            if eval_every and self.step == 0:
                do_eval()
            while self.step < total:
                x, y, w = data.batch(data.train, self.sampler.next_indices(rows))
                st = self.train_step(x, y, w)
                history.append(st)
                record({"step": st.step, "loss": st.loss, "lr": st.lr, "grad_norm": st.grad_norm,
                        "loss_scale": st.loss_scale, "skipped": st.skipped, "tokens_per_s": st.tokens_per_second,
                        "loss_tokens": st.loss_tokens, "trained_tokens": self.trained_tokens,
                        "peak_rss": st.peak_rss, "ms": st.ms})
                if on_step:
                    on_step(st)
                if eval_every and (self.step % eval_every == 0 or self.step == total):
                    do_eval()
                if out_dir is not None and save_every and self.step % save_every == 0:
                    self.save_step(out_dir, keep)
                    last_saved = self.step
                if interrupted:  # Ctrl-C: stop at this step boundary with a checkpoint to resume from
                    if out_dir is not None and last_saved != self.step:
                        self.save_step(out_dir, keep)
                    raise KeyboardInterrupt
            if out_dir is not None and last_saved != self.step:
                self.save_step(out_dir, keep)
        finally:
            if metrics is not None:
                metrics.close()
            if prev is not None:
                signal.signal(signal.SIGINT, prev)
        return {"history": history, "evals": evals, "report": self.efficiency_report(history)}

    def efficiency_report(self, history) -> dict[str, Any]:
        hs = history[1:] if len(history) > 1 else history
        if not hs:
            return {}
        step_s = float(np.mean([h.seconds for h in hs]))
        ms = {p: float(np.mean([h.ms.get(p, 0.0) for h in hs])) for p in hs[0].ms}
        ms["other"] = max(0.0, step_s * 1e3 - sum(ms.values()))
        return {"backend": getattr(self.backend, "name", "?"), "precision": self.precision,
                "fine_tune_type": "lora" if self.lora is not None else "full", "ms_per_step": step_s * 1e3,
                "ms": ms, "tokens_per_s": float(np.mean([h.tokens for h in hs])) / step_s,
                "loss_tokens_per_s": float(np.mean([h.loss_tokens for h in hs])) / step_s,
                "peak_rss_bytes": peak_rss_bytes(), "compile_s": self.model.compile_seconds,
                "trained_params": int(sum(v.size for v in self.trained_params.values())),
                "steps_measured": len(hs)}

    def close(self) -> None:
        self.model.close()


# ---- one whole job (the CLI and Engine.finetune) ------------------------------------------------

def lora_config_of(s: dict, n_layers: int) -> LoraConfig:
    rank = int(s["lora_rank"])
    if s["lora_alpha"] is not None and s["lora_scale"] is not None:
        raise ValueError("give --lora-alpha or --lora-scale, not both (alpha = scale·rank)")
    alpha = (float(s["lora_alpha"]) if s["lora_alpha"] is not None
             else float(s["lora_scale"]) * rank if s["lora_scale"] is not None else 2.0 * rank)
    return LoraConfig(rank=rank, alpha=alpha, targets=tuple(t.strip() for t in str(s["lora_targets"]).split(",") if t.strip()),
                      layers=last_layers(s["lora_layers"], n_layers))


def last_layers(n, n_layers: int):
    if n is None:
        return None
    n = int(n)
    if not 1 <= n <= n_layers:
        raise ValueError(f"--lora-layers must be in 1..{n_layers} (the model's blocks), got {n}")
    return tuple(range(n_layers - n, n_layers))


def run_job(settings: dict, *, say: Callable[[str], None] | None = None,
            on_step: Callable[[FinetuneStats, "FinetuneEngine"], None] | None = None,
            on_eval: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Load the model, validate every data row, build the engine, resume if asked, train and save
    into ``adapter_path``: the whole of ``python -m rustane.finetune`` (``settings``: ``DEFAULTS``'
    keys). Nothing is written before the model and the data are read. Returns ``fit``'s result."""
    from rustane import models
    from rustane.finetune_data import Tokenization, open_finetune_data
    from rustane.formats import describe_source, load_model, resolve_source

    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown fine-tuning settings {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    s = {**DEFAULTS, **settings}
    for req in ("model", "data"):
        if not s.get(req):
            raise ValueError(f"--{req} is required (or set {req}: in the -c config file)")
    say = say or (lambda msg: log.info(msg))
    tc = TrainConfig(lr=float(s["learning_rate"]), min_lr=s["min_lr"], warmup=int(s["warmup"]), steps=int(s["steps"]),
                     accum=int(s["accum"]), clip=s["clip"], weight_decay=float(s["weight_decay"]),
                     loss_scale=s["loss_scale"]).validate()
    if int(s["batch_size"]) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {s['batch_size']}")
    # 1. the model's description and tokenizer, 2. every data row: both before anything is written
    m = load_model(resolve_source(s["model"]))
    n_layers = m.spec.n_layers
    seq_len = int(s["seq_len"]) if s["seq_len"] is not None else min(m.spec.max_position, 256)
    data = open_finetune_data(s["data"], Tokenization.of_model(m), seq_len, mask_prompt=bool(s["mask_prompt"]),
                              truncate=bool(s["truncate"]), fit=s["fit"], valid_fraction=float(s["valid_fraction"]),
                              split_seed=int(s["seed"]))
    lora = lora_config_of(s, n_layers) if s["fine_tune_type"] == "lora" else None
    layers = None if lora is not None else last_layers(s["lora_layers"], n_layers)
    out = Path(s["adapter_path"])
    resume_from = latest_checkpoint(out) if s["resume"] else None
    if s["resume"] and resume_from is None:
        raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'} (run without --resume to start)")
    if not s["resume"] and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose "
                         f"another --adapter-path")
    models.config_from_hf(m.config)  # refuses what the kernels cannot train, before compiling
    say(describe_source(m))
    say(f"data: {len(data.train)} train rows"
        f"{'' if data.valid is None else f', {len(data.valid)} valid rows'} of {seq_len} tokens ({data.fit}); "
        f"{100 * data.loss_token_share():.1f}% of computed tokens carry loss")
    eng = FinetuneEngine(s["model"], lora=lora, backend=s["backend"], precision=s["precision"], seq_len=seq_len,
                         seed=int(s["seed"]), train=tc, freeze_embeddings=bool(s["freeze_embeddings"]), layers=layers,
                         ane_rules=not s["research"], imported=m)
    del m
    try:
        if resume_from is not None:
            st = eng.load_trained(resume_from)
            say(f"resumed from {resume_from} at step {st['step']}")
        trained = sum(v.size for v in eng.trained_params.values())
        say(f"{s['fine_tune_type']}: {trained:,} trained parameters; backend {eng.backend.name} "
            f"{eng.precision}; compile {eng.model.compile_seconds:.1f} s")
        res = eng.fit(data, batch_size=int(s["batch_size"]), out=out, save_every=int(s["save_every"]),
                      keep=int(s["keep"]), eval_every=int(s["eval_every"]), eval_batches=s["eval_batches"],
                      on_step=None if on_step is None else (lambda st: on_step(st, eng)), on_eval=on_eval)
    finally:
        eng.close()
    res["out"] = out
    return res
