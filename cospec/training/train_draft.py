"""``cospec train-draft``: train an EAGLE-3 draft head for a model on the user's data, on the machine at hand.

Each step takes a batch of examples, runs the (frozen) target over it once to get the aux hidden states and its
next-token distributions (computed on the fly: nothing is dumped to disk; the target's states of each example are
kept in memory, up to ``TARGET_CACHE_BYTES``, so later epochs skip its forward), then unrolls the head for
``ttt_steps`` steps (training-time test, ``cospec.decoding.eagle3``) and minimizes, at every step s, the
cross-entropy of the head's prediction of token t + 2 + s against the target's distribution over the draft vocabulary,
weighted by ``step_decay ** s``. Positions where the target's top token is outside the draft vocabulary are left
out (the head could never be right there). AdamW, linear warm-up and cosine decay, gradient clipping.

Terms:
- draft vocabulary: the ``draft_vocab_size`` most frequent target tokens among the trained tokens of the data.
- top-1 agreement (step s): the head's top token equals the target's.
- acceptance at draft position s: the fraction of anchors whose drafts 1..s all agree with the target (teacher
  forced on the data's own tokens, which are the target's greedy tokens for regenerated answers); the mean accepted
  length of a chain of k drafts is 1 + the sum of those fractions for s <= k.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cospec.decoding.eagle3 import Eagle3Head
from cospec.decoding.eagle3_checkpoint import load_head, save_head
from cospec.training.data import Example, chat_example, read_sources, regenerate, text_examples, without_benchmarks
from cospec.training.objective import Batch, Targets, TargetStateCache, make_batch, target_outputs, ttt_loss

CHECKPOINT_DIR = "checkpoint"
LOG_NAME = "training_log.json"
REGENERATED_NAME = "regenerated.jsonl"
# Answers are regenerated this many at a time, with room in the KV cache for all of them at full length (a smaller
# cache would preempt and recompute sequences over and over).
REGENERATE_BATCH = 32
REGENERATE_KV_BYTES = 2 << 30
TARGET_CACHE_BYTES = 4 << 30
"""Memory for the target's states of the training examples (aux hidden states and final hidden state, about 9 KB
per token for SmolLM2): an example seen again in a later epoch skips the target's forward, which costs as much as
the head's own training step."""


@dataclass(slots=True)
class TrainConfig:
    model: str = "smollm2-135m"
    data: list[str] = field(default_factory=list)
    """Files or directories (text, code, ShareGPT .json/.jsonl); empty: the model's default recipe
    (``cospec.training.recipes``)."""
    out: str | None = None
    """Output directory; None: where ``draft_head="default"`` finds the model's head."""
    regenerate: bool = False
    """Let the target write the assistant turns of conversations itself (greedy, cospec's engine)."""
    regenerate_max_tokens: int = 256
    max_turns: int | None = None
    """With ``regenerate``: keep at most this many user turns per conversation."""
    max_len: int = 512
    """Tokens per training sequence (longer texts are cut into chunks, longer conversations cut)."""
    max_train_tokens: int | None = None
    """Stop reading data once the training examples hold this many trained tokens."""
    draft_vocab_size: int = 8192
    ttt_steps: int = 3
    """Measured on SmolLM2 (8 CPU minutes each, default data): with 3 or 2 unrolled steps each optimizer step is
    cheaper, so the same time reaches a higher acceptance at draft 1 than with 5, and almost no draft past the third
    is accepted at this scale."""
    step_decay: float = 0.8
    batch_size: int = 2
    """Small batches: on a CPU the head is limited by optimizer steps, not tokens (8 minutes of SmolLM2: batch 2,
    272 steps, acceptance at position 1 0.26; batch 8, 60 steps, 0.14)."""
    epochs: int | None = None
    """Passes over the data; None: 1, or the recipe's (``recipes.EPOCHS``) for the default recipe. A time budget
    stops the run earlier."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    max_grad_norm: float = 0.5
    heldout_fraction: float = 0.05
    max_heldout_examples: int = 32
    eval_every: int = 100
    checkpoint_every: int = 200
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    dtype: str | None = None
    """Model dtype; None: float32 on the CPU, bfloat16 on CUDA."""
    max_minutes: float | None = None
    """Wall-clock budget of the whole run (data, regeneration, training): the learning-rate schedule runs on
    whichever of steps and time is further along, and training stops with the budget spent. None: no limit, except
    for the default recipe (``recipes.MAX_MINUTES``)."""
    filter_benchmarks: bool = True
    """Drop training text that contains an MT-Bench question or a HumanEval problem (cospec bench measures there)."""
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_len", "draft_vocab_size", "ttt_steps", "batch_size", "epochs", "eval_every",
                     "checkpoint_every", "regenerate_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.step_decay <= 1:
            raise ValueError(f"step_decay must be in (0, 1], got {self.step_decay}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")


def draft_vocabulary(examples: list[Example], size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent trained tokens (ties and a short corpus filled by the lowest ids), sorted."""
    counts = Counter(t for e in examples for t, m in zip(e.token_ids, e.loss_mask) if m)
    chosen = [t for t, _ in counts.most_common(size)]
    if len(chosen) < size:
        taken = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in taken][: size - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def init_head(head: Eagle3Head, target) -> None:
    """Start from the target's own output space: the LM head rows of the draft tokens and the final norm, so the
    head only has to learn states the target's LM head already reads; other weights as HF initializes Llama."""
    std = getattr(head.config, "initializer_range", 0.02)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
        draft_ids = head.to_target_ids(torch.arange(head.draft_vocab_size, device=head.d2t.device))
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[draft_ids])
        final_norm = getattr(target.get_decoder(), "norm", None)
        if final_norm is not None and final_norm.weight.shape == head.norm.weight.shape:
            head.norm.weight.copy_(final_norm.weight)


def lr_factor(step: int, total_steps: int, warmup_fraction: float, min_fraction: float,
              time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to ``min_fraction`` over the steps, or over the time budget when
    ``time_fraction`` (of it spent) is further along."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total_steps - warmup), time_fraction))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def batches_of(examples: list[Example], batch_size: int, seed: int) -> list[list[Example]]:
    """Shuffled batches of examples of similar length (sorted within windows of 8 batches, to waste little on
    padding), in a shuffled order; the same for the same seed."""
    rng = random.Random(seed)
    order = list(examples)
    rng.shuffle(order)
    window = 8 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda e: len(e.token_ids))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Evaluation:
    loss: float
    agreement: list[float]
    acceptance: list[float]  # per draft position (1-based position s at index s - 1)

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + sum(self.acceptance)


@torch.no_grad()
def evaluate(head: Eagle3Head, heldout: list[tuple[Batch, Targets]], config: TrainConfig) -> Evaluation:
    results = [ttt_loss(head, b, t, config.ttt_steps, config.step_decay) for b, t in heldout]
    weights = [r.num_anchors for r in results]
    total = max(sum(weights), 1)
    loss = sum(float(r.loss) * w for r, w in zip(results, weights)) / total
    agreement = [sum(r.agreement[s] * w for r, w in zip(results, weights)) / total for s in range(config.ttt_steps)]
    acceptance = [sum(r.chain_counts[s] for r in results) / total for s in range(config.ttt_steps)]
    return Evaluation(loss, agreement, acceptance)


def build_examples(config: TrainConfig, model, tokenizer, out: Path) -> list[Example]:
    """Training examples from ``config.data`` (or the model's default recipe), benchmark items dropped, answers
    regenerated if asked (cached in ``out``, so that a resumed run reuses them)."""
    from cospec.training import recipes

    if config.data:
        conversations, texts = read_sources(config.data)
        regenerate_conversations, max_turns = config.regenerate, config.max_turns
    else:
        conversations, texts = recipes.default_sources(config.model, config.seed)
        regenerate_conversations, max_turns = True, 1
    if config.filter_benchmarks:
        from cospec.training.corpora import BenchmarkFilter

        conversations, texts = without_benchmarks(conversations, texts, BenchmarkFilter.default())
    cached = out / REGENERATED_NAME
    if regenerate_conversations and conversations:
        if cached.exists():
            conversations = [json.loads(line) for line in cached.read_text().splitlines()]
        else:
            from cospec.engine.llm import LLM

            llm = LLM(model, tokenizer=tokenizer, max_num_seqs=REGENERATE_BATCH, max_num_batched_tokens=2048,
                      kv_cache_memory_bytes=REGENERATE_KV_BYTES)
            conversations = regenerate(llm, conversations, config.regenerate_max_tokens, max_turns, REGENERATE_BATCH)
            out.mkdir(parents=True, exist_ok=True)
            cached.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    examples = []
    budget = config.max_train_tokens or float("inf")
    trained = 0
    sources = [("chat", c) for c in conversations] + [("text", t) for t in texts]
    for kind, item in random.Random(config.seed).sample(sources, len(sources)):
        new = [chat_example(tokenizer, item, config.max_len)] if kind == "chat" else text_examples(
            tokenizer, item, config.max_len)
        for example in new:
            if example is not None and trained < budget:
                examples.append(example)
                trained += example.num_trained_tokens
        if trained >= budget:
            break
    if not examples:
        raise ValueError("no training examples: the data holds no text and no conversation with an assistant turn")
    return examples


def train_draft(config: TrainConfig | None = None, **options) -> Path:
    """Train a draft head (``TrainConfig`` fields as keyword arguments); returns the directory it is saved in."""
    from cospec.engine.models import default_draft_head_dir, load_model

    config = config or TrainConfig(**options)
    if not config.data:  # the default recipe fits its budget on 2 CPU cores
        from cospec.training import recipes

        config = dataclasses.replace(config, max_minutes=config.max_minutes or recipes.MAX_MINUTES,
                                     epochs=config.epochs or recipes.EPOCHS)
    started = time.perf_counter()
    out = Path(config.out) if config.out else default_draft_head_dir(config.model)
    dtype = config.dtype or ("bfloat16" if str(config.device).startswith("cuda") else "float32")
    model, tokenizer = load_model(config.model, dtype=dtype, device=config.device)
    examples = build_examples(config, model, tokenizer, out)
    if len(examples) < 2:
        raise ValueError("need at least two training examples (one is held out)")
    examples = random.Random(config.seed).sample(examples, len(examples))
    num_heldout = min(config.max_heldout_examples, max(1, int(len(examples) * config.heldout_fraction)))
    train_head(model, examples[num_heldout:], examples[:num_heldout], config, out, started)
    return out


def train_head(model, train_examples: list[Example], heldout_examples: list[Example], config: TrainConfig,
               out: Path, started: float | None = None) -> Eagle3Head:
    """Train a head for ``model`` (frozen) on ``train_examples``, checkpointing into ``out/checkpoint`` (resumed
    from there with ``config.resume``); save it in the speculators layout in ``out`` with ``training_log.json``."""
    started = started or time.perf_counter()
    model.requires_grad_(False)
    device = next(model.parameters()).device
    checkpoint = out / CHECKPOINT_DIR
    torch.manual_seed(config.seed)
    vocab = draft_vocabulary(train_examples, config.draft_vocab_size, model.get_output_embeddings().weight.shape[0])
    head = Eagle3Head.for_target(model, vocab).float()  # float32 weights, also beside a bfloat16 target
    init_head(head, model)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    plan = [b for epoch in range(config.epochs or 1)
            for b in batches_of(train_examples, config.batch_size, config.seed + epoch)]
    state_cache = TargetStateCache(TARGET_CACHE_BYTES)
    training_started = time.perf_counter()
    deadline = started + 60 * config.max_minutes if config.max_minutes else None

    def time_fraction() -> float:
        if deadline is None:
            return 0.0
        return (time.perf_counter() - training_started) / max(deadline - training_started, 1e-9)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, len(plan), config.warmup_fraction, config.min_lr_fraction, time_fraction()))
    log = {"config": dataclasses.asdict(config), "evaluations": [], "train_tokens": 0}
    step = 0
    if config.resume and (checkpoint / "trainer.pt").exists():
        state = torch.load(checkpoint / "trainer.pt", weights_only=False)
        head.load_state_dict(load_head(checkpoint, model).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, log = state["step"], state["log"]
        torch.set_rng_state(state["torch_rng"])

    heldout = [(b, target_outputs(model, head, b)) for b in
               (make_batch(heldout_examples[i:i + config.batch_size], device)
                for i in range(0, len(heldout_examples), config.batch_size))]
    evaluation = evaluate(head, heldout, config)
    if step == 0:
        log["evaluations"].append({"step": 0, "train_tokens": 0, **dataclasses.asdict(evaluation)})
    bar = tqdm(total=len(plan), initial=step, desc="cospec train-draft", unit="batch", disable=not config.progress)
    with bar:
        for batch_examples in plan[step:]:
            batch = make_batch(batch_examples, device)
            states = state_cache.states(model, head, batch, [id(e) for e in batch_examples])
            result = ttt_loss(head, batch, target_outputs(model, head, batch, states=states), config.ttt_steps,
                              config.step_decay)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            log["train_tokens"] += int(batch.loss_mask.sum())
            out_of_time = deadline is not None and time.perf_counter() >= deadline and step < len(plan)
            if step % config.eval_every == 0 or step == len(plan) or out_of_time:
                evaluation = evaluate(head, heldout, config)
                log["evaluations"].append({"step": step, "train_tokens": log["train_tokens"],
                                           **dataclasses.asdict(evaluation)})
            bar.set_postfix(loss=f"{result.loss.item():.3f}", heldout_top1=f"{evaluation.agreement[0]:.3f}",
                            accepted=f"{evaluation.mean_accepted_length:.2f}")
            bar.update()
            if step % config.checkpoint_every == 0 and step < len(plan):
                _save_checkpoint(head, optimizer, scheduler, step, log, checkpoint, config)
            if out_of_time:
                log["stopped_by_time_budget"] = True
                bar.write(f"cospec train-draft: the {config.max_minutes:g}-minute budget is spent; stopping after "
                          f"{step} of {len(plan)} batches")
                break

    head.eval()
    log.update({"seconds": time.perf_counter() - started, "peak_rss_bytes": _peak_rss_bytes(),
                "num_train_examples": len(train_examples), "num_heldout_examples": len(heldout_examples),
                "final": dataclasses.asdict(evaluation), "mean_accepted_length": evaluation.mean_accepted_length})
    save_head(head, out, verifier_name=config.model, verifier_architectures=model.config.architectures,
              num_speculative_tokens=config.ttt_steps)
    (out / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    if config.progress:
        print(acceptance_report(evaluation, log))
    return head


def acceptance_report(evaluation: Evaluation, log: dict) -> str:
    lines = [f"held-out acceptance per draft position (teacher-forced, chain of {len(evaluation.acceptance)}):"]
    for position, (rate, agree) in enumerate(zip(evaluation.acceptance, evaluation.agreement), start=1):
        lines.append(f"  draft {position}: accepted {rate:.3f}  (top-1 agreement {agree:.3f})")
    lines.append(f"mean accepted length {evaluation.mean_accepted_length:.2f} tokens per target forward; "
                 f"{log['train_tokens']} trained tokens in {log['seconds'] / 60:.1f} min, "
                 f"peak RSS {log['peak_rss_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def _save_checkpoint(head, optimizer, scheduler, step, log, directory: Path, config: TrainConfig) -> None:
    save_head(head, directory, verifier_name=config.model, num_speculative_tokens=config.ttt_steps)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "log": log,
                "torch_rng": torch.get_rng_state()}, directory / "trainer.pt")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- command line ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``cospec train-draft``, one per ``TrainConfig`` field (``--draft-vocab-size`` -> ``draft_vocab_size``),
    with its defaults."""
    parser.add_argument("--model", default=_default("model"),
                        help="embedded model name, model directory or .gguf file")
    parser.add_argument("--data", nargs="+", default=[], metavar="PATH", help="text files or directories (code, "
                        "prose) and ShareGPT .json/.jsonl conversations; none: the default recipe")
    parser.add_argument("--out", default=_default("out"),
                        help="output directory (default: where --draft-head default finds it)")
    parser.add_argument("--regenerate", action="store_true", help="the model writes the assistant answers itself")
    parser.add_argument("--regenerate-max-tokens", type=int, default=_default("regenerate_max_tokens"),
                        help="longest regenerated answer")
    parser.add_argument("--max-turns", type=int, default=_default("max_turns"),
                        help="with --regenerate: user turns kept per conversation")
    training = parser.add_argument_group("training")
    training.add_argument("--max-len", type=int, default=_default("max_len"), help="tokens per training sequence")
    training.add_argument("--max-train-tokens", type=int, default=_default("max_train_tokens"),
                          help="stop reading data at this many trained tokens")
    training.add_argument("--draft-vocab-size", type=int, default=_default("draft_vocab_size"),
                          help="tokens of the head's vocabulary")
    training.add_argument("--ttt-steps", type=int, default=_default("ttt_steps"),
                          help="unrolled steps of the training-time test")
    training.add_argument("--step-decay", type=float, default=_default("step_decay"),
                          help="loss weight decay per unrolled step")
    training.add_argument("--batch-size", type=int, default=_default("batch_size"))
    training.add_argument("--epochs", type=int, default=_default("epochs"),
                          help="passes over the data (default: 1; with the default recipe, up to 8 as its time allows)")
    training.add_argument("--lr", type=float, default=_default("lr"))
    training.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    training.add_argument("--warmup-fraction", type=float, default=_default("warmup_fraction"))
    training.add_argument("--max-grad-norm", type=float, default=_default("max_grad_norm"))
    training.add_argument("--eval-every", type=int, default=_default("eval_every"),
                          help="steps between held-out evaluations")
    training.add_argument("--checkpoint-every", type=int, default=_default("checkpoint_every"),
                          help="steps between checkpoints")
    training.add_argument("--seed", type=int, default=_default("seed"))
    training.add_argument("--max-minutes", type=float, default=_default("max_minutes"),
                          help="wall-clock budget of the run; training stops when it is spent "
                          "(default: none, 30 with the default recipe)")
    training.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    training.add_argument("--device", default=_default("device"), help="torch device (cpu, cuda)")
    training.add_argument("--dtype", default=_default("dtype"),
                          help="model dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    training.add_argument("--no-filter-benchmarks", dest="filter_benchmarks", action="store_false",
                          help="keep training text that contains MT-Bench or HumanEval items")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def _default(name: str):
    return TrainConfig.__dataclass_fields__[name].default
