"""The public API scripts and the CLI share: build a model, train, evaluate, save, generate.

    from rustane.engine import Engine, TrainConfig
    eng = Engine("tiny", backend="sim", precision="fp16", seed=0)
    stats = eng.train_step((x, y))            # x, y: int [accum, seq_len]
    eng.save("runs/x/step-00000010")
    eng = Engine.from_checkpoint("runs/x/step-00000010")

``Engine.fit`` is the whole training loop (sampling, eval, checkpoints, metrics.jsonl); the CLI
(``python -m rustane.train``) only parses flags, builds an Engine and shows progress.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from rustane import checkpoint, models
from rustane.config import ModelConfig, preset
from rustane import run_dir
from rustane.divergence import DEFAULT_MAX_NONFINITE, DivergenceGuard
from rustane.errors import Diverged, ResumeError, UsageError
from rustane.interrupts import Interrupted, StopRequests
from rustane.optim import AdamW, make_loss_scaler
from rustane.runtime.model import Model
# the settings and stats Engine shares with FinetuneEngine (re-exported: scripts import them from here)
from rustane.train_settings import StepStats, TrainConfig, make_backend

log = logging.getLogger("rustane.engine")
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"

__all__ = ["Engine", "TrainConfig", "StepStats", "make_backend", "kernel_flops_per_sequence"]


def kernel_flops_per_sequence(cfg: ModelConfig) -> float:
    """Matmul FLOPs of all kernel evals for one sequence (forward + backward dx, no dW): the
    family's plan knows them."""
    return models.family_for(cfg).flops_per_sequence(cfg)


def saved_train_config(state: dict[str, Any], where: Path) -> TrainConfig | None:
    """The ``TrainConfig`` a checkpoint's trainer state recorded (None when it has none)."""
    if "train" not in state:
        return None
    try:
        return TrainConfig(**state["train"])
    except (TypeError, UsageError) as exc:
        raise ResumeError(f"{where / checkpoint.STATE_FILE}: bad training settings ({exc}); resume from "
                          f"another checkpoint, or start a new run from its weights with --model {where}") from None


def _check_engine_args(config, backend, precision, seed, train, params, ane_rules) -> None:
    """Engine arguments of the wrong type or value fail here, with the argument named, rather
    than deep inside the model build."""
    if not isinstance(config, (str, ModelConfig)) and not hasattr(config, "param_shapes"):
        raise UsageError(f"Engine: config must be a preset name or a ModelConfig, got {type(config).__name__}")
    from rustane import backends

    if isinstance(backend, str):
        if backend != "auto" and backend not in backends.names():
            raise UsageError(f"Engine: backend must be one of auto, {', '.join(backends.names())} "
                             f"(or a Backend), got {backend!r}")
    elif not hasattr(backend, "compile"):
        raise UsageError(f"Engine: backend must be a name or a Backend instance, got {type(backend).__name__}")
    if not isinstance(precision, str) or precision not in backends.precisions():
        raise UsageError(f"Engine: precision must be one of {', '.join(backends.precisions())}, got {precision!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise UsageError(f"Engine: seed must be a non-negative integer, got {seed!r}")
    if train is not None and not isinstance(train, TrainConfig):
        raise UsageError(f"Engine: train must be a TrainConfig, got {type(train).__name__}")
    if params is not None and not isinstance(params, dict):
        raise UsageError(f"Engine: params must be a dict of arrays keyed by HF names, got {type(params).__name__}")
    if not isinstance(ane_rules, bool):
        raise UsageError(f"Engine: ane_rules must be True or False, got {ane_rules!r}")


class Engine:
    def __init__(self, config: ModelConfig | str = "tiny", backend: str | Any = "auto",
                 precision: str = "fp16", seed: int = 0, train: TrainConfig | None = None,
                 params: dict[str, np.ndarray] | None = None, ane_rules: bool = True):
        _check_engine_args(config, backend, precision, seed, train, params, ane_rules)
        self.config = preset(config) if isinstance(config, str) else config
        self.config.validate()
        self.precision = precision
        self.backend = make_backend(backend, precision, ane_rules) if isinstance(backend, str) else backend
        self.seed = int(seed)
        self.train_config = (train or TrainConfig()).validate()
        self.model = Model(self.config, self.backend, params, seed=self.seed)
        tc = self.train_config
        self.optimizer = AdamW(self.model.params, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                               weight_decay=tc.weight_decay)
        self.scaler = make_loss_scaler(tc.loss_scale)
        self.schedule = tc.schedule()
        self.step = 0
        self.trainer_state: dict[str, Any] = {}  # what a loaded checkpoint carried (data cursor...)
        # SHA-256 of the training tokens (rustane.run_dir.describe_data), saved with checkpoints
        # so a resume on other data is caught
        self.data_sha256: str | None = None
        self.sampler = None
        self.save_extra_files: dict[str, bytes] = {}  # more files saved with every checkpoint
        # the model's tokenizer (a tokenizer.json string) and its settings (chat template,
        # special tokens): saved in every checkpoint, so no later command needs --tokenizer
        self.tokenizer_json: str | None = None
        self.tokenizer_config: dict[str, Any] = {}

    # ---- construction from a checkpoint ---------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, backend: str | Any = "auto", precision: str = "fp16",
                        train: TrainConfig | None = None, expected: ModelConfig | None = None,
                        load_optimizer: bool = True, ane_rules: bool = True) -> "Engine":
        """Restore an engine. ``train`` overrides the saved training settings (a warning names what
        changed, since exact resume needs the same ones); ``expected`` refuses a different model.
        With ``load_optimizer`` (resuming) a checkpoint without complete, consistent trainer and
        optimizer state is refused (``checkpoint.check_resumable``); without it, the weights load."""
        if load_optimizer:
            checkpoint.check_resumable(path)
        ck = checkpoint.load(path, expected, load_optimizer=load_optimizer)
        state = ck.trainer_state
        saved_train = saved_train_config(state, Path(path))
        if train is not None and saved_train is not None and train != saved_train:
            a, b = asdict(saved_train), asdict(train)
            log.warning("training settings differ from the checkpoint's (resume will not be exact): %s",
                        ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]))
        eng = cls(ck.config, backend, precision, seed=int(state.get("seed", 0)),
                  train=train or saved_train, params=ck.params, ane_rules=ane_rules)
        if load_optimizer and ck.optimizer_tensors:
            eng.optimizer.load_state(ck.optimizer_tensors, ck.optimizer_meta)
        if "loss_scaler" in state and state["loss_scaler"].get("type") == (
                "dynamic" if eng.train_config.loss_scale == "dynamic" else "static"):
            eng.scaler.load_state_dict(state["loss_scaler"])
        eng.step = ck.step
        eng.trainer_state = state
        eng.data_sha256 = state.get("data_sha256")
        eng._read_tokenizer_files(Path(path))
        return eng

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, backend: str | Any = "auto", precision: str = "fp16", *,
                        seq_len: int | None = None, seed: int = 0, train: TrainConfig | None = None,
                        tokenizer: str | os.PathLike | None = None, ane_rules: bool = True) -> "Engine":
        """An engine holding a pretrained model, ready to fine-tune: ``src`` is a Hugging Face
        folder, a ``.gguf`` file, a llama2.c ``.bin`` (``tokenizer``: its tokenizer.bin) or a
        rustane checkpoint. ``seq_len`` is the training context the kernels are compiled for
        (default: the model's context, at most 256); RoPE positions are absolute, so any
        ``seq_len`` up to the model's context computes what the model was trained to.

        Trains every family in ``rustane.models`` (Llama with plain, llama3 or linear RoPE,
        SmolLM2, Qwen3); what the kernels cannot compute is refused with the way out: generate
        and evaluate run every imported model on the CPU."""
        from rustane.formats import describe_source, load_model, resolve_source

        m = load_model(resolve_source(src), tokenizer=tokenizer)
        try:
            cfg = models.config_from_hf(m.config)
        except ValueError as exc:
            raise ValueError(f"{describe_source(m)}: the training kernels cannot train this model ({exc}); "
                             f"python -m rustane.generate / rustane.evaluate --model run it on the CPU") from exc
        limit = m.spec.max_position
        cfg = cfg.replace(seq_len=int(seq_len) if seq_len is not None else min(limit, 256))
        if cfg.seq_len > limit:
            log.warning("--seq-len %d exceeds the model's trained context %d: positions past it are "
                        "extrapolated", cfg.seq_len, limit)
        eng = cls(cfg, backend, precision, seed=seed, train=train,
                  params=checkpoint.from_hf_params(m.tensors, cfg), ane_rules=ane_rules)
        eng.tokenizer_json, eng.tokenizer_config = m.tokenizer_json, dict(m.tokenizer_config)
        return eng

    # ---- training -------------------------------------------------------------------------

    def _as_batch(self, batch) -> tuple[np.ndarray, np.ndarray]:
        S = self.config.seq_len
        if isinstance(batch, tuple) and len(batch) == 2:
            x, y = (np.atleast_2d(np.asarray(b)) for b in batch)
        else:
            t = np.atleast_2d(np.asarray(batch))
            if t.shape[-1] != S + 1:
                raise ValueError(f"batch: expected (x, y) or tokens [B, seq_len+1={S + 1}], got shape {t.shape}")
            x, y = t[:, :-1], t[:, 1:]
        if x.shape != y.shape or x.shape[-1] != S:
            raise ValueError(f"batch: x and y must both be [B, seq_len={S}], got {x.shape} and {y.shape}")
        return x, y

    def train_step(self, batch) -> StepStats:
        """One optimizer step over the batch's sequences (gradient accumulation over its rows)."""
        x, y = self._as_batch(batch)
        m, timer = self.model, self.model.timer
        timer.reset()
        t_start = time.perf_counter()
        scale = self.scaler.scale
        losses = [m.forward_backward(x[i], y[i], loss_scale=scale) for i in range(len(x))]
        lr = self.schedule(self.step)
        # the model finishes the gradients, updates and re-stages its weights (or drops the
        # gradients of a skipped update)
        info = m.optimizer_step(self.optimizer, self.scaler, lr, max_norm=self.train_config.clip, accum=len(x))
        self.step += 1
        seconds = time.perf_counter() - t_start
        return StepStats(step=self.step, loss=float(np.mean(losses)), lr=lr, grad_norm=info.grad_norm,
                         loss_scale=info.loss_scale, skipped=not info.applied, tokens=x.size,
                         seconds=seconds, ms=timer.ms(), evals=timer.evals)

    def evaluate(self, batches: Iterable, max_batches: int | None = None) -> float:
        """Mean loss over ``(x, y)`` batches (e.g. ``TokenData.val_batches()``), forward only."""
        if max_batches is not None and max_batches < 1:
            raise UsageError(f"evaluate: max_batches (--eval-batches) must be >= 1, got {max_batches}")
        total, n = 0.0, 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = self._as_batch(batch)
            for r in range(len(x)):
                total += self.model.loss(x[r], y[r])
                n += 1
        if n == 0:
            raise ValueError("evaluate: no validation batches (is the validation split shorter than seq_len + 1?)")
        return total / n

    # ---- inference ------------------------------------------------------------------------

    def forward(self, tokens) -> np.ndarray:
        """Logits ``[n, vocab]`` for ``n <= seq_len`` tokens (causal: padding after them is inert)."""
        t = np.asarray(tokens, dtype=np.int64).ravel()
        S = self.config.seq_len
        if not 0 < t.size <= S:
            raise ValueError(f"forward: expected 1..{S} tokens (seq_len), got {t.size}")
        padded = np.zeros(S, dtype=np.int32)
        padded[:t.size] = t
        return self.model.logits(padded)[:, :t.size].T.copy()

    def generate(self, prompt: list[int] | np.ndarray, n: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, stop_id: int | None = None,
                 top_p: float | None = None) -> list[int]:
        """Sample up to ``n`` tokens after ``prompt`` with the CPU KV-cache decoder over the
        current weights (fp32; contexts beyond seq_len slide, see ``rustane.decoder``)."""
        from rustane.decoder import KVCacheDecoder

        ids = [int(i) for i in np.asarray(prompt).ravel()]
        dec = KVCacheDecoder.from_imported(self.to_imported(), context=self.config.seq_len)
        gen = dec.generate(ids, n, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=self.seed if seed is None else seed,
                           stop_ids=() if stop_id is None else (stop_id,))
        return gen.tokens

    def to_imported(self):
        """The current model in ``rustane.formats``' family-neutral form (HF config and tensors)."""
        import warnings

        from rustane.formats import Imported

        self.model.finish_gradients()
        with warnings.catch_warnings():  # residual scaling: the decoder reads it from "rustane"
            warnings.simplefilter("ignore")
            hf = self.config.to_hf_dict(allow_residual_scaling=True)
        return Imported(config=hf, tensors=checkpoint.to_hf_params(self.model.params, self.config),
                        tokenizer_json=self.tokenizer_json, tokenizer_config=dict(self.tokenizer_config))

    # ---- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        st = {"seed": self.seed, "train": asdict(self.train_config), "loss_scaler": self.scaler.state_dict(),
              "precision": self.precision, "backend": getattr(self.backend, "name", str(self.backend))}
        if self.sampler is not None:
            st["data"] = self.sampler.state_dict()
        if self.data_sha256 is not None:
            st["data_sha256"] = self.data_sha256
        return st

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint directory atomically (model, optimizer, trainer state)."""
        self.model.finish_gradients()
        st = self.state()
        st.update(extra or {})
        return checkpoint.save(path, self.config, self.model.params, step=self.step,
                               optimizer_tensors=self.optimizer.state_tensors(),
                               optimizer_meta=self.optimizer.state_meta(), trainer_state=st,
                               extra_files={**self._tokenizer_files(), **self.save_extra_files})

    def _tokenizer_files(self) -> dict[str, bytes]:
        files = {}
        if self.tokenizer_json is not None:
            files[TOKENIZER_FILE] = self.tokenizer_json.encode("utf-8")
        settings = {k: v for k, v in self.tokenizer_config.items() if k != "eos_token_ids"}
        if settings:
            files[TOKENIZER_CONFIG_FILE] = json.dumps(settings, indent=2).encode("utf-8")
        return files

    def _read_tokenizer_files(self, path: Path) -> None:
        if (path / TOKENIZER_FILE).is_file():
            self.tokenizer_json = (path / TOKENIZER_FILE).read_text(encoding="utf-8")
        if (path / TOKENIZER_CONFIG_FILE).is_file():
            self.tokenizer_config = json.loads((path / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))

    def use_tokenizer_of(self, data) -> None:
        """Adopt ``data``'s tokenizer (a ``TokenData`` that tokenized text) when none is known."""
        if self.tokenizer_json is None and getattr(data, "tokenizer", None) is not None:
            self.tokenizer_json = data.tokenizer.to_str()

    # ---- the training loop ----------------------------------------------------------------

    def fit(self, data, steps: int | None = None, *, out: str | os.PathLike | None = None,
            save_every: int = 0, keep: int | None = None, eval_every: int = 0, eval_batches: int = 8,
            on_step: Callable[[StepStats], None] | None = None,
            on_eval: Callable[[int, float], None] | None = None,
            max_nonfinite: int = DEFAULT_MAX_NONFINITE) -> dict[str, Any]:
        """Train until ``steps`` optimizer steps are done (default: the schedule's length).

        ``data`` is a ``rustane.data.TokenData``. With ``out``, metrics are appended to
        ``out/metrics.jsonl`` and checkpoints written to ``out/step-N`` every ``save_every``
        steps and at the end (``keep`` newest kept). A resumed engine continues the data
        sampler where the checkpoint left it, so the run is bit-identical to an unbroken one;
        ``metrics.jsonl`` rows past the step it starts at are dropped first (each step once).

        Stops early, always after saving a checkpoint in ``out``: on SIGINT/SIGTERM
        (``rustane.interrupts.Interrupted``), and when the loss stays non-finite for
        ``max_nonfinite`` steps (``rustane.errors.Diverged``; 0 never stops; see
        ``rustane.divergence``).
        """
        total = self.train_config.steps if steps is None else int(steps)
        accum = self.train_config.accum
        if data.seq_len != self.config.seq_len:
            raise ValueError(f"data seq_len {data.seq_len} != model seq_len {self.config.seq_len}")
        self.use_tokenizer_of(data)
        if self.sampler is None:
            self.sampler = data.sampler(self.seed)
            if "data" in self.trainer_state:
                self.sampler.load_state_dict(self.trainer_state["data"])
        out_dir = Path(out) if out is not None else None
        metrics = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for p in checkpoint.clean_stale_temps(out_dir):
                log.info("removed %s (a save interrupted when its process died)", p)
            # one history per folder: rows past the step this run starts at are redone below
            run_dir.truncate_metrics(out_dir, self.step if self.step > 0 else -1)
            metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        history: list[StepStats] = []
        evals: list[tuple[int, float]] = []

        def record(obj: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(obj, allow_nan=True) + "\n")
                metrics.flush()

        def do_eval() -> None:
            val = self.evaluate(data.val_batches(), max_batches=eval_batches)
            evals.append((self.step, val))
            record({"step": self.step, "val_loss": val})
            if on_eval:
                on_eval(self.step, val)

        # SIGINT/SIGTERM stop at the next step boundary and save there, so the checkpoint resumes
        # exactly; a second signal does not abandon that save, a third aborts (rustane.interrupts)
        last_saved = None
        guard = DivergenceGuard(max_nonfinite, self.precision, self.train_config.lr)
        diverged: str | None = None
        stops = StopRequests()
        try:
            with stops:
                if eval_every and self.step == 0:
                    do_eval()
                while self.step < total and not stops.requested:
                    x, y = self.sampler.next_batch(accum)
                    st = self.train_step((x, y))
                    history.append(st)
                    record({"step": st.step, "loss": st.loss, "lr": st.lr, "grad_norm": st.grad_norm,
                            "loss_scale": st.loss_scale, "skipped": st.skipped,
                            "tokens_per_s": st.tokens_per_second, "ms": st.ms})
                    if on_step:
                        on_step(st)
                    diverged = guard.observe(st.step, st.loss, st.grad_norm)
                    if stops.requested or diverged:
                        break
                    if eval_every and (self.step % eval_every == 0 or self.step == total):
                        do_eval()
                    if out_dir is not None and save_every and self.step % save_every == 0:
                        stops.saving = True
                        last_saved = self.save_step(out_dir, keep)
                        stops.saving = False
                if diverged:
                    saved = self._save_if_finite(out_dir, keep, stops)
                    where = (f"the last state (finite weights, step {self.step}) is saved in {saved}" if saved
                             else f"the last good checkpoint is {checkpoint.latest(out_dir)}"
                             if out_dir is not None and checkpoint.latest(out_dir) is not None
                             else "nothing was saved")
                    raise Diverged(f"{diverged}; {where}", checkpoint=saved, step=self.step)
                if out_dir is not None and last_saved != self.step:
                    stops.saving = True
                    last_saved = self.save_step(out_dir, keep)
                    stops.saving = False
        finally:
            if metrics is not None:
                metrics.close()
        if stops.requested:
            saved = checkpoint.step_dir(out_dir, self.step) if out_dir is not None else None
            raise Interrupted(stops.signame or "interrupt", self.step, saved)
        return {"history": history, "evals": evals, "report": self.efficiency_report(history)}

    def _save_if_finite(self, out_dir: Path | None, keep: int | None, stops: StopRequests) -> Path | None:
        """Save the current state when every weight is finite (a diverged run's skipped updates
        leave them so); a state with inf/NaN weights is not worth a checkpoint."""
        if out_dir is None:
            return None
        self.model.finish_gradients()
        if not all(np.isfinite(w).all() for w in self.model.params.values()):
            return None
        stops.saving = True
        self.save_step(out_dir, keep)
        stops.saving = False
        return checkpoint.step_dir(out_dir, self.step)

    def save_step(self, out_dir: str | os.PathLike, keep: int | None = None) -> int:
        """Checkpoint to ``out_dir/step-N`` and prune to the ``keep`` newest; returns the step."""
        out_dir = Path(out_dir)
        self.save(checkpoint.step_dir(out_dir, self.step))
        if keep:
            checkpoint.prune(out_dir, keep)
        return self.step

    # ---- reporting ------------------------------------------------------------------------

    def efficiency_report(self, history: list[StepStats]) -> dict[str, Any]:
        """Averages over ``history`` (the first step, which warms caches, is left out when possible)."""
        hs = history[1:] if len(history) > 1 else history
        if not hs:
            return {}
        ms = {p: float(np.mean([h.ms.get(p, 0.0) for h in hs])) for p in hs[0].ms}
        step_ms = float(np.mean([h.seconds for h in hs])) * 1e3
        ms["other"] = max(0.0, step_ms - sum(ms.values()))
        tokens = float(np.mean([h.tokens for h in hs]))
        eval_s = ms.get("evals", 0.0) / 1e3
        flops = kernel_flops_per_sequence(self.config) * self.train_config.accum
        return {
            "backend": getattr(self.backend, "name", "?"), "precision": self.precision,
            "ms_per_step": step_ms, "ms": ms, "tokens_per_s": tokens / (step_ms / 1e3),
            "evals_per_step": float(np.mean([h.evals for h in hs])),
            "kernel_tflops": (flops / eval_s / 1e12) if eval_s > 0 else float("nan"),
            "compile_s": self.model.compile_seconds, "steps_measured": len(hs),
        }

    @staticmethod
    def finetune(model: str | os.PathLike, data: str | os.PathLike, **settings) -> dict[str, Any]:
        """Fine-tune a pretrained ``model`` on ``data`` (LoRA by default) and save into
        ``adapter_path``: exactly ``python -m rustane.finetune``, with its flags as keyword
        arguments (``fine_tune_type="full"``, ``lora_rank=8``, ``mask_prompt=True``, ``steps``,
        ``adapter_path``, ``resume``...; docs/finetune.md). Returns the loop's result (``history``,
        ``evals``, ``report``, ``out``). Scripts that drive steps themselves use
        ``rustane.finetune_engine.FinetuneEngine``."""
        from rustane.finetune_engine import run_job

        return run_job({**settings, "model": model, "data": data})

    def close(self) -> None:
        self.model.close()
