"""A small downstream signal during training: lm-eval on a few documents of a few tasks, every N steps.

The model is ZeRO-partitioned and expert-sharded across the ranks, so its weights are gathered into a
plain `MoETransformer` on rank 0 (tied banks shared, as trained), which `trainer.evaluate` scores with
lm-evaluation-harness on the offline task data; the other ranks wait. Scores go to the progress line,
metrics.jsonl and TensorBoard (`downstream/<task>`). A quick trend line, not a benchmark: use
`python -m trainer.evaluate` on a checkpoint for that.
"""

from __future__ import annotations

from typing import Any

from models.transformer import build_model
from trainer import engine as eng
from trainer.config import TrainConfig
from trainer.evaluate import LogitsModel, check_tasks, fewshot_fit, run_tasks
from trainer.export_tokenizer import run_tokenizer
from trainer.session import Session


def tasks_of(s: Session) -> list[str]:
    return [t.strip() for t in s.cfg.run.downstream_tasks.split(",") if t.strip()]


def check_task_names(cfg: TrainConfig) -> None:
    """run.downstream_tasks names shipped tasks whose data is installed; the one-line ValueError names the
    config key (check_tasks alone said "unknown task 'x'", which a training command line does not spell)."""
    try:
        check_tasks([t.strip() for t in cfg.run.downstream_tasks.split(",") if t.strip()])
    except ValueError as err:
        raise ValueError(f"run.downstream_tasks={cfg.run.downstream_tasks!r}: {err}") from None


def check_fewshot(cfg: TrainConfig) -> list[str]:
    """run.downstream_fewshot against the tasks' examples and the run's sequence length, for the launcher:
    too many shots failed only at the first downstream scoring, mid-run, and shots that cannot fit were
    cut without a word. One-line ValueError naming the key; returns notes (`evaluate.fewshot_fit`)."""
    run = cfg.run
    rt = run_tokenizer(cfg)
    if rt.path is None:
        raise ValueError(f"run.downstream_every={run.downstream_every}: {rt.note}")
    # `scores` gives lm-eval min(data.seq_len, model.max_seq_len); config validation keeps seq_len the smaller
    tasks = [t.strip() for t in run.downstream_tasks.split(",") if t.strip()]
    try:
        notes = fewshot_fit(tasks, run.downstream_fewshot, rt.path, cfg.data.seq_len, f"data.seq_len={cfg.data.seq_len}")
    except ValueError as err:
        raise ValueError(f"run.downstream_fewshot={run.downstream_fewshot}: {err}") from None
    return [f"note: run.downstream_fewshot={run.downstream_fewshot}: {note}" for note in notes]


def check(s: Session) -> Any:
    """Tasks, shots and tokenizer usable (one-line ValueError otherwise); returns the tokenizer. The shots are
    checked here too, on rank 0, for launchers other than trainer.launch (`deepspeed run.sh`), and their notes
    are printed here, for all."""
    check_task_names(s.cfg)
    rt = run_tokenizer(s.cfg)
    if rt.path is None:
        raise ValueError(f"run.downstream_every={s.cfg.run.downstream_every}: {rt.note}")
    if s.rank == 0:
        for note in check_fewshot(s.cfg):
            print(note, flush=True)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(rt.path), eos_token=rt.eos_token,
                                        pad_token=rt.eos_token, bos_token=rt.eos_token)
    return tokenizer


def scores(s: Session, tokenizer: Any) -> dict[str, float] | None:
    """Per-task primary score (acc_norm or acc) and their mean, on rank 0; None elsewhere. Collective."""
    state = eng.gather_state_dict(s.engine, master=s.cfg.run.precision == "bf16")
    result = None
    if s.rank == 0:
        model = build_model(s.model_cfg)
        model.load_state_dict(state)
        model.eval()
        max_len = min(s.cfg.data.seq_len, s.model_cfg.max_seq_len)
        run = s.cfg.run
        try:
            per_task = run_tasks(LogitsModel(model, max_len), tokenizer, tasks_of(s), run.downstream_fewshot,
                                 run.downstream_limit, batch_size=8, max_len=max_len)
        except ValueError as err:  # it names evaluate's flags (--num-fewshot); a training run sets these keys
            raise ValueError(f"run.downstream_fewshot={run.downstream_fewshot} (run.downstream_tasks="
                             f"{run.downstream_tasks!r}): {err}") from None
        result = {task: row["score"] for task, row in per_task.items()}
        result["mean"] = sum(result.values()) / len(per_task)
    eng.barrier()
    return result
