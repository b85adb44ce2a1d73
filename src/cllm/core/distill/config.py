"""The settings of one distillation run, as flags give them and provenance records them.

Everything that changes the trained student is a field here and is hashed into the
output's id; where a file lives (the teacher cache, the state folder) and how often the
run reports are not, except `save_every`, which never changes the result either and is
kept out of the identity for that reason.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from cllm.core.distill.losses import DIVERGENCES, HIDDEN_LOSSES
from cllm.errors import UsageError

# fields that do not change the trained student: left out of the provenance id
NOT_IDENTITY = ("eval_every", "eval_chunks", "save_every", "teacher_cache", "log_every")


@dataclass
class DistillConfig:
    loss: str = "fkl"  # fkl | rkl | jsd
    beta: float = 0.5  # jsd's mixture weight
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the distillation term; 1 - alpha goes to cross-entropy
    hidden_loss: str | None = None  # mse | cosine
    hidden_weight: float = 1.0
    layer_map: str = "auto"  # auto | "s:t,s:t,..." (student layer : teacher layer)
    attn_weight: float = 0.0  # attention-map transfer (KL), where head counts match
    steps: int = 300
    batch_size: int = 4  # global: windows per optimizer step, before accumulation
    grad_accum: int = 1
    seqlen: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = -1  # steps; -1 = 5% of steps
    min_lr: float = 0.1  # the cosine schedule ends at lr x min_lr
    clip: float = 1.0
    seed: int = 0
    data: str | None = None  # plain text; None = the shipped WikiText-2 validation text
    top_k: int = 0  # 0: full teacher distribution; k: the teacher's top k plus a tail bucket
    teacher_dtype: str = "fp32"  # fp32 | bf16
    precision: str = "auto"  # student forward/backward: auto | fp32 | bf16
    freeze: list[str] = field(default_factory=list)
    lora_rank: int = 0
    lora_alpha: int = 0  # 0 = 2 x rank
    keep_sparsity: bool = True
    init_layers: list[int] | None = None
    dequantize: bool = False
    teacher_cache: str | None = None
    eval_every: int = 0
    eval_chunks: int = 4
    save_every: int = 50
    log_every: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """What the output's provenance id is made of."""
        data = self.to_dict()
        for name in NOT_IDENTITY:
            data.pop(name, None)
        if data["top_k"] == 0:
            data.pop("top_k")
        return data

    @property
    def warmup_steps(self) -> int:
        return max(0, round(0.05 * self.steps)) if self.warmup < 0 else self.warmup

    def validate(self) -> None:
        def bad(what: str, hint: str = "") -> UsageError:
            return UsageError(what, hint)

        for name, value in (
            ("--beta", self.beta), ("--temperature", self.temperature), ("--alpha", self.alpha),
            ("--hidden-weight", self.hidden_weight), ("--attn-weight", self.attn_weight),
            ("--lr", self.lr), ("--weight-decay", self.weight_decay), ("--min-lr", self.min_lr),
            ("--clip", self.clip),
        ):  # fmt: skip
            if not math.isfinite(value):
                raise bad(f"{name} {value} is not a finite number")
        if self.weight_decay < 0 or self.clip < 0 or self.lora_alpha < 0:
            raise bad("--weight-decay, --clip and --lora-alpha must not be negative")
        if self.loss not in DIVERGENCES:
            raise bad(f"--loss {self.loss} is not known", "Use fkl, rkl or jsd")
        if not 0.0 < self.beta < 1.0:
            raise bad(
                f"--beta {self.beta:g} is outside (0, 1)", "jsd mixes the two with 0 < beta < 1"
            )
        if not self.temperature > 0:
            raise bad(f"--temperature {self.temperature:g} must be positive", "e.g. 1 or 2")
        if not 0.0 <= self.alpha <= 1.0:
            raise bad(
                f"--alpha {self.alpha:g} is outside [0, 1]",
                "1 is pure distillation, 0 pure cross-entropy on the data",
            )
        if self.hidden_loss is not None and self.hidden_loss not in HIDDEN_LOSSES:
            raise bad(f"--hidden-loss {self.hidden_loss} is not known", "Use mse or cosine")
        if self.hidden_weight < 0 or self.attn_weight < 0:
            raise bad("--hidden-weight and --attn-weight must not be negative")
        if self.layer_map != "auto":
            parse_layer_map(self.layer_map)
        for name, value, least in (
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--grad-accum", self.grad_accum, 1),
            ("--seqlen", self.seqlen, 8),
            ("--eval-chunks", self.eval_chunks, 1),
            ("--save-every", self.save_every, 1),
        ):
            if value < least:
                raise bad(f"{name} {value} is too small", f"Use at least {least}")
        if self.eval_every < 0 or self.top_k < 0 or self.lora_rank < 0:
            raise bad("--eval-every, --top-k and --lora-rank must not be negative")
        if not self.lr > 0:
            raise bad(f"--lr {self.lr:g} must be positive")
        if not 0.0 <= self.min_lr <= 1.0:
            raise bad(f"--min-lr {self.min_lr:g} is outside [0, 1]", "a fraction of --lr")
        if self.warmup >= self.steps:
            raise bad(f"--warmup {self.warmup} is not shorter than --steps {self.steps}")
        if self.teacher_dtype not in ("fp32", "bf16"):
            raise bad(f"--teacher-dtype {self.teacher_dtype} is not known", "Use fp32 or bf16")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise bad(f"--precision {self.precision} is not known", "Use auto, fp32 or bf16")
        if self.teacher_cache is not None and self.top_k == 0:
            raise bad("--teacher-cache stores the teacher's top-k", "Add --top-k, e.g. --top-k 64")
        if self.teacher_cache is not None and (self.hidden_loss or self.attn_weight > 0):
            raise bad(
                "--teacher-cache stores logits only",
                "Drop --hidden-loss / --attn-weight, or the cache (hidden states need the teacher)",
            )
        if self.lora_rank and self.freeze:
            raise bad("--lora-rank trains adapters only; --freeze has nothing left to freeze")
        for pattern in self.freeze:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise bad(f"--freeze {pattern!r} is not a regular expression ({exc})") from None
        if self.init_layers is not None and (
            not self.init_layers or len(set(self.init_layers)) != len(self.init_layers)
        ):
            raise bad("--init layers: needs distinct layer numbers", "e.g. --init layers:0,2,4,6")


def parse_layer_map(text: str) -> list[tuple[int, int]]:
    """`0:0,1:2,2:4` -> [(0, 0), (1, 2), (2, 4)] (student layer, teacher layer)."""
    pairs = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m:
            raise UsageError(
                f"--layer-map {text!r} is not a list of student:teacher pairs",
                "e.g. --layer-map 0:1,1:3,2:5, or auto",
            )
        pairs.append((int(m.group(1)), int(m.group(2))))
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise UsageError(f"--layer-map {text!r} maps a student layer twice")
    return pairs


def parse_init(text: str | None) -> list[int] | None:
    """`layers:0,2,4-7` -> [0, 2, 4, 5, 6, 7]; None stays None."""
    if text is None:
        return None
    kind, _, spec = text.partition(":")
    if kind != "layers" or not spec:
        raise UsageError(f"--init {text!r} is not known", "Use --init layers:0,2,4,6")
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(
                f"--init {text!r}: {part!r} is not a layer or range", "e.g. layers:0,2,4-7"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise UsageError(f"--init {text!r}: range {part} runs backwards")
        out.extend(range(lo, hi + 1))
    return sorted(set(out)) if len(set(out)) == len(out) else out  # duplicates are refused later
