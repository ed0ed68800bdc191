"""E5 (part 1): train the byte-level model of the accuracy study.

Trains :class:`fieldprint.model.Transformer` on random windows of the training plays
(``train_path``) and measures the loss on fixed windows of the held-out plays (``valid_path``).
Seeded (initialization, dropout, batch order). The loop stops at ``max_steps`` or after
``max_minutes``, whichever comes first, and the learning-rate schedule (linear warm-up, cosine
decay to ``min_lr_frac * lr``) follows the larger of the two progress fractions, so a run cut
short by the clock still ends annealed. When the clock binds, the number of steps depends on the
hardware; the CSV records it.

Writes ``<out_dir>/model.pt`` (atomically: model config, weights in ``save_dtype``, training
summary) and the loss curve ``e5_train.csv``: one row per evaluation with ``step, tokens,
seconds, lr, train_loss`` (nats per byte, mean since the previous row), ``val_loss`` (nats per
byte) and ``val_bpb`` (bits per byte).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fieldprint.experiments.common import ExperimentConfig, check, hydra_main, resolve_device
from fieldprint.model import ModelConfig, Transformer
from fieldprint.results import atomic_write_bytes

AUTOCAST = ("none", "bf16")
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class E5TrainConfig(ExperimentConfig):
    train_path: str = "data/corpus/train.txt"
    valid_path: str = "data/corpus/valid.txt"
    # model
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    context: int = 128
    dropout: float = 0.0
    rope_base: float = 10000.0
    # optimization
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 1000
    max_minutes: float = 3.0
    # evaluation and output
    eval_every: int = 200
    val_windows: int = 64  # fixed windows of `context` bytes, evenly spaced over valid_path
    autocast: str = "none"
    compile: bool = False
    save_dtype: str = "bf16"
    threads: int = 0  # CPU threads for torch (0: torch's default)

    def validate(self) -> None:
        super().validate()
        self.model_config()  # raises on a bad model shape
        for name in ("batch_size", "max_steps", "eval_every", "val_windows"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                  f"{name} must be a positive int, got {getattr(self, name)!r}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr_frac <= 1, f"min_lr_frac must be in [0, 1], got {self.min_lr_frac}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        check(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        check(self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}")
        check(self.autocast in AUTOCAST, f"autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        check(self.save_dtype in SAVE_DTYPES,
              f"save_dtype must be one of {tuple(SAVE_DTYPES)}, got {self.save_dtype!r}")

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layer=self.n_layer, d_model=self.d_model, n_head=self.n_head,
                           n_kv_head=self.n_kv_head, context=self.context, dropout=self.dropout,
                           rope_base=self.rope_base)


def read_bytes(path: str, name: str) -> torch.Tensor:
    """The file's bytes as a [N] uint8 tensor; a missing file is a clear error."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{name}={path!r} is not a file (build the corpus: python -m fieldprint.corpus data/corpus)")
    return torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)


def val_windows(data: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` windows of ``length`` bytes, evenly spaced over data: [count, length] int64."""
    if data.numel() < length + count:
        raise ValueError(f"text of {data.numel()} bytes is too short for {count} windows of {length}")
    starts = torch.linspace(0, data.numel() - length, count).long()
    return data[starts[:, None] + torch.arange(length)].long()


def lr_at(cfg: E5TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_frac * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _autocast(cfg: E5TrainConfig, device: str):
    if cfg.autocast == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch: int, amp) -> float:
    """Mean next-byte loss (nats) over windows [N, L+1] (inputs 0..L-1, targets 1..L)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        with amp:
            loss = model.loss(w[:, :-1], w[:, 1:])
        total += float(loss) * w[:, 1:].numel()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def run(cfg: E5TrainConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    check(cfg.autocast == "none" or device == "cuda", "autocast='bf16' needs device cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train = read_bytes(cfg.train_path, "train_path").to(device)
    valid = val_windows(read_bytes(cfg.valid_path, "valid_path"), cfg.context + 1,
                        cfg.val_windows).to(device)
    check(train.numel() > cfg.context + 1, f"train_path has only {train.numel()} bytes")

    model = Transformer(cfg.model_config()).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device == "cuda",
    )
    forward = torch.compile(model) if cfg.compile else model
    amp = _autocast(cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    offsets = torch.arange(cfg.context + 1, device=device)
    budget_s = cfg.max_minutes * 60

    rows: list[dict] = []
    started = time.monotonic()
    # the running train loss stays on the device: no host synchronization per step
    running, running_n, step, lr = torch.zeros((), device=device), 0, 0, cfg.lr
    model.train()
    while True:
        elapsed = time.monotonic() - started
        progress = max(step / cfg.max_steps, elapsed / budget_s)
        done = progress >= 1.0
        if done or (step % cfg.eval_every == 0 and step > 0):
            val = evaluate(model, valid, cfg.batch_size, amp)
            rows.append({
                "step": step, "tokens": step * cfg.batch_size * cfg.context,
                "seconds": round(elapsed, 2), "lr": lr,
                "train_loss": float(running) / running_n if running_n else float("nan"),
                "val_loss": val, "val_bpb": val / math.log(2), "final": done,
            })
            running, running_n = torch.zeros((), device=device), 0
        if done:
            break
        lr = lr_at(cfg, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train.numel() - cfg.context - 1, (cfg.batch_size,),
                               device=device, generator=gen)
        batch = train[starts[:, None] + offsets].long()
        with amp:
            loss = next_byte_loss(forward, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running += loss.detach().float()
        running_n += 1
        step += 1

    save_checkpoint(Path(cfg.out_dir) / "model.pt", model, cfg, rows[-1])
    return rows


def next_byte_loss(forward, batch: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy of batch [B, L+1] through forward (the module, maybe compiled)."""
    logits = forward(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def save_checkpoint(path: Path, model: Transformer, cfg: E5TrainConfig, final: dict) -> None:
    """Model config + weights (in cfg.save_dtype) + training summary, written atomically."""
    dtype = SAVE_DTYPES[cfg.save_dtype]
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"model_config": asdict(model.cfg), "state_dict": state,
                "train": {"config": asdict(cfg), "final": final}}, buf)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    hydra_main("e5_train", E5TrainConfig, run)
