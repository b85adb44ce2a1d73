"""`cllm distill` as a job of the shared pipeline (`cllm.core.job`).

The output is an HF folder of the student's architecture. Its provenance id covers the
student input, the teacher's and the training text's hashes and every setting that
changes the result, so re-running the same command reuses the output and `--resume`
finds the state a killed run left beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cllm.core.distill.config import DistillConfig
from cllm.core.job import Events, Job, OutputSpec, state_dir
from cllm.errors import InputError, UsageError
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.inputs import Source, require_checkpoint, resolve_input
from cllm.formats.outputs import Kind

HELD_OUT_CTX = 512


@dataclass
class DistillRequest:
    teacher: str
    cfg: DistillConfig
    resume: bool = False
    on_step: Callable[[int, dict[str, float]], None] | None = None  # Python callers' hook


RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _launcher_int(names: tuple[str, ...], default: int) -> int:
    import os

    for name in names:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return default


def is_main_process() -> bool:
    """Under `accelerate launch` (torchrun or MPI) only rank 0 writes and prints; before
    accelerate is set up, the launcher's variables say which process this is."""
    return _launcher_int(RANK_VARIABLES, 0) == 0


def world_size() -> int:
    return _launcher_int(SIZE_VARIABLES, 1)


class DistillJob(Job):
    op = "distill"

    def __init__(self, req: DistillRequest) -> None:
        self.req = req
        self.cfg = req.cfg
        self.teacher_source: Source | None = None
        self.data: Any = None
        self.params: dict[str, Any] = {}
        self.held_out_chunks: list[Any] | None = None

    def validate(self) -> None:
        self.cfg.validate()

    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec(Kind.HF_FOLDER, "safetensors", "")]

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        from cllm.core.distill.data import load_train_data
        from cllm.core.distill.loop import resolve_precision
        from cllm.core.distill.student import require_float_student

        cfg = self.cfg
        if world_size() > 1 and "-" in (source.text, self.req.teacher):
            raise UsageError(
                "'-' (stdin) under a multi-process launch: every process would read it",
                "Pass the checkpoint's path",
            )
        student = require_checkpoint(source)
        require_float_student(student, cfg.dequantize)
        tsrc = resolve_input(self.req.teacher)
        teacher = require_checkpoint(tsrc)
        self.teacher_source = tsrc
        check_pair(student, teacher, source.text, tsrc.text)
        preflight(cfg, student.config, teacher.config, world_size())
        if cfg.eval_every:
            self.held_out_chunks = held_out_chunks(student, cfg.eval_chunks)
        cfg.precision = resolve_precision(cfg.precision)  # provenance records what ran
        self.data = load_train_data(
            Path(cfg.data) if cfg.data else None, student.tokenizer_dir(), cfg.seqlen, cfg.seed,
            cfg.batch_size,
        )  # fmt: skip
        check_same_tokens(student, teacher, Path(self.data.path), source.text, tsrc.text)
        self.params = {
            "config": cfg.identity(),
            "teacher": {"sha256": tsrc.sha256, "path": str(tsrc.location)},
            "data": self.data.to_provenance(),
        }
        return self.params

    def provenance_extras(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed}

    def saved_provenance(self, out: Path, pid: str) -> dict[str, Any] | None:
        from cllm.core.distill import state as S
        from cllm.core.distill.teacher import describe_difference

        saved = S.latest(state_dir(out))
        if saved is None:
            saved = _sibling_state(out)
        if saved is None:
            return None
        if saved.meta.get("job_id") != pid:
            diff = describe_difference(_flat(saved.meta.get("identity", {})), _flat(self.params))
            raise UsageError(
                f"--resume: the interrupted run at {saved.path.parent} used other settings ({diff or 'another input'})",
                "Resume with its settings, or drop --resume to start afresh",
            )
        prov = saved.meta.get("provenance")
        return prov if isinstance(prov, dict) else None

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        from cllm.core.distill import state as S
        from cllm.core.distill.loop import HeldOut, RunSetup, train
        from cllm.core.distill.student import build_student, student_plans
        from cllm.core.distill.teacher import Teacher, TopKCache
        from cllm.core.eval.backends import build_torch_model
        from cllm.formats.save import save_hf_folder

        cfg = self.cfg
        ckpt = require_checkpoint(source)
        assert self.teacher_source is not None
        tckpt = require_checkpoint(self.teacher_source)
        eager = cfg.attn_weight > 0
        student = build_student(ckpt, cfg, attn_eager=eager)
        if tckpt.sha256 != ckpt.sha256:
            student.layers_from = None  # built from another model's layers: no pairing by origin
        trainable, total = student.counts()
        events.log(
            f"distilling {source.text} ({total:,} parameters, {trainable:,} trained) from {self.teacher_source.text}"
            + (
                f"; keeping the zeros of {len(student.masks)} sparse matrices"
                if student.masks
                else ""
            )
        )
        precision = cfg.precision  # resolved in prepare; the teacher's passes run in it too
        needs_teacher = cfg.alpha > 0 or cfg.hidden_loss or eager or cfg.eval_every
        teacher = None
        if needs_teacher:
            teacher = Teacher(
                lambda: build_torch_model(tckpt, attn_implementation="eager" if eager else None),
                dict(tckpt.config),
                cfg.teacher_dtype,
                precision,
            )
        held_out = None
        if self.held_out_chunks is not None:
            held_out = HeldOut(self.held_out_chunks, HELD_OUT_CTX)
        cache = None
        if cfg.teacher_cache:
            cache = TopKCache(
                Path(cfg.teacher_cache),
                {
                    "teacher_sha256": self.params["teacher"]["sha256"],
                    "data_sha256": self.data.sha256,
                    "seqlen": cfg.seqlen,
                    "top_k": cfg.top_k,
                    "temperature": cfg.temperature,
                    "teacher_dtype": cfg.teacher_dtype,
                    "teacher_precision": precision,  # its outputs differ by it
                },
            )
        folder = state_dir(paths[0])
        resume_from = S.latest(folder) if self.req.resume else None
        if self.req.resume and resume_from is None:
            events.warn("--resume: no saved state for this run; starting from step 0")
        setup = RunSetup(
            cfg=cfg, student=student, teacher=teacher, data=self.data, held_out=held_out,
            cache=cache, state_folder=folder, identity=self.params, job_id=provenance["id"],
            resume_from=resume_from, provenance=provenance, on_step=self.req.on_step,
        )  # fmt: skip
        report = train(setup, events)
        if is_main_process():
            provenance = dict(provenance)
            provenance["result"] = {
                "final": report["final"],
                "evals": report["evals"],
                "steps": report["steps"],
                "tokens_per_s": report["tokens_per_s"],
                "precision": report["precision"],
                "processes": report["processes"],
            }
            plans = student_plans(student)
            with events.progress("writing", len(plans)):
                save_hf_folder(
                    paths[0], student.config, plans, ckpt.tokenizer_dir(), provenance, ckpt.gguf_kv
                )
            S.remove(folder)
            if teacher is not None and not teacher.loaded:
                events.log("the teacher was never loaded: every window came from the cache")
            final = report["final"]
            events.log(
                f"done: {report['steps']} steps, loss {final.get('loss', float('nan')):.4f}, "
                f"{report['tokens_per_s'] or 0:,.0f} training tokens/s"
            )
        _barrier()
        return report


def _barrier() -> None:
    try:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    except Exception:  # noqa: BLE001 - single process: nothing to wait for
        pass


def _flat(params: dict[str, Any]) -> dict[str, Any]:
    """Nested params as one level (`config.lr`), so a difference names the setting."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            for k, v in _flat(value).items():
                out[f"{key}.{k}"] = v
        else:
            out[key] = value
    return out


def _sibling_state(out: Path) -> Any:
    """A default-named output's state under another settings hash: the same student and
    command with other flags (what --resume should refuse and explain)."""
    from cllm.core.distill import state as S

    stem, sep, _digest = out.name.rpartition(".distill-")
    if not sep:
        return None
    candidates = []
    for folder in out.parent.glob(f".{stem}.distill-*.cllm-state"):
        saved = S.latest(folder)
        if saved is not None:
            candidates.append(saved)
    if not candidates:
        return None
    return max(candidates, key=lambda s: s.path.stat().st_mtime)


def preflight(
    cfg: DistillConfig, s_config: dict[str, Any], t_config: dict[str, Any], world: int
) -> None:
    """The refusals that need only the two configs, made before anything is loaded or
    created (the training loop checks the same for Python callers)."""
    from cllm.core.distill.loop import layer_pairs

    if cfg.batch_size % world:
        raise UsageError(
            f"--batch-size {cfg.batch_size} does not split over {world} processes",
            f"Use a multiple of {world}",
        )
    vocab = t_config.get("vocab_size")
    if cfg.top_k and isinstance(vocab, int) and cfg.top_k > vocab:
        raise UsageError(f"--top-k {cfg.top_k} is more than the vocabulary's {vocab} tokens")
    n_student = (
        len(cfg.init_layers)
        if cfg.init_layers is not None
        else int(s_config.get("num_hidden_layers", 0))
    )
    n_teacher = int(t_config.get("num_hidden_layers", 0))
    if cfg.hidden_loss or cfg.attn_weight > 0:
        layer_pairs(cfg, n_student, n_teacher, None)  # an explicit map out of range is refused
    if cfg.attn_weight > 0:
        s_heads, t_heads = s_config.get("num_attention_heads"), t_config.get("num_attention_heads")
        if s_heads != t_heads:
            raise UsageError(
                f"--attn-weight needs the same head count (student {s_heads}, teacher {t_heads})",
                "Drop --attn-weight for students with pruned heads",
            )


def held_out_chunks(student: Checkpoint, chunks: int) -> list[Any]:
    """--eval-every's WikiText-2 test chunks, checked before any work."""
    from cllm.core.eval.data import load_tokens, make_chunks
    from cllm.paths import default_eval_text

    path = default_eval_text()
    if not path.is_file():
        raise InputError(
            f"--eval-every needs the WikiText-2 test text, not found at {path}",
            "Set CLLM_DATA_DIR to the folder holding wikitext-2/wiki.test.raw, or drop --eval-every",
        )
    ids = load_tokens(path, student.tokenizer_dir()).ids
    available = len(ids) // HELD_OUT_CTX
    if chunks > available:
        raise UsageError(
            f"--eval-chunks {chunks} asks for more than the {available} chunks of {HELD_OUT_CTX} tokens in {path.name}"
        )
    return make_chunks(ids, HELD_OUT_CTX, chunks)


def check_pair(student: Checkpoint, teacher: Checkpoint, s_name: str, t_name: str) -> None:
    """The same vocabulary on both sides, or one line with both sizes."""
    from cllm.core.eval.compare import vocab_size

    sv, tv = vocab_size(student), vocab_size(teacher)
    if sv is not None and tv is not None and sv != tv:
        raise InputError(
            f"the student {s_name} has a vocabulary of {sv} tokens and the teacher {t_name} {tv}",
            "Distillation matches next-token distributions; pick a teacher of the student's family and tokenizer",
        )


def check_same_tokens(
    student: Checkpoint, teacher: Checkpoint, text: Path, s_name: str, t_name: str
) -> None:
    import numpy as np

    from cllm.core.eval.data import load_tokens

    if student.sha256 == teacher.sha256:
        return
    a = load_tokens(text, student.tokenizer_dir(), what="training text").ids
    b = load_tokens(text, teacher.tokenizer_dir(), what="training text").ids
    if len(a) != len(b) or not np.array_equal(a, b):
        raise InputError(
            f"the student {s_name} and the teacher {t_name} tokenize the training text differently",
            "Distillation needs the same tokenizer on both sides",
        )
