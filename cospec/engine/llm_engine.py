"""LLMEngine: requests in, tokens out, one scheduled ragged forward of the target per step.

``step()`` reads top to bottom: schedule, propose drafts, run the target over prefill chunks and verify windows,
verify (accept drafts, add the target's token), postprocess. Plain decoding is the case of windows without drafts.
Every KV cache belongs to the engine (a paged pool per model, one block table per sequence shared by the target
and the draft), allocated once at start-up within a memory budget.
"""

from __future__ import annotations

import itertools
import numbers
import time

import torch
from torch import nn

from cospec.decoding.draft_length import DraftLengthPolicy
from cospec.decoding.eagle3_proposer import Eagle3Proposer
from cospec.decoding.fusion import fuse_logits_rows
from cospec.decoding.ngram_model import NgramLM, NgramProposer
from cospec.decoding.proposers import ModelDraftProposer, PromptLookupProposer
from cospec.decoding.protocols import Draft, DraftRequest, ForwardItem
from cospec.decoding.verification import Verified, Window, defer, greedy_tokens, verify, verify_plain_greedy
from cospec.engine import companions
from cospec.engine.block_manager import BlockManager, RegionBlockManager
from cospec.engine.config import EngineConfig, FusionConfig, SpeculativeConfig
from cospec.engine.head_runner import HeadRunner
from cospec.engine.kv_cache import kv_bytes_per_token
from cospec.engine.model_runner import ModelRunner
from cospec.engine.sampling_params import SamplingParams
from cospec.engine.scheduler import ScheduledSeq, Scheduler
from cospec.engine.sequence import RequestOutput, Sequence, SequenceStatus, TokenLogprob

DEFAULT_KV_CACHE_BYTES = 1 << 30
_NO_DRAFT = Draft([])  # shared by every window without drafts (never modified)


class LLMEngine:
    def __init__(self, model: nn.Module | str, config: EngineConfig | None = None, tokenizer=None,
                 dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                 speculative: SpeculativeConfig | None = None, fusion: FusionConfig | None = None) -> None:
        model_name = model if isinstance(model, str) else getattr(model, "name_or_path", None)
        if isinstance(model, str):
            from cospec.engine.models import load_model

            model, loaded_tokenizer = load_model(model, dtype=dtype or torch.float32, device=device or "cpu")
            tokenizer = tokenizer or loaded_tokenizer
        # (eval() walks every module, ~150 us on a small model: generate() builds an engine per call)
        self.model = model.eval() if any(m.training for m in model.modules()) else model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        text_config = model.config.get_text_config()
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_model_len = config.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        kv_dtype = next(model.parameters()).dtype
        self.speculative = speculative
        self.fusion = fusion
        member_models = companions.fusion_members(model, self.vocab_size, fusion, dtype, tokenizer)
        draft_model, draft_layers = companions.draft_source(model, speculative, dtype, tokenizer)
        draft_is_member = draft_model is not None and any(draft_model is m for m in member_models)
        draft_head = companions.draft_head(model, speculative, model_name)
        kv_per_token = kv_bytes_per_token(text_config, kv_dtype)
        if draft_head is not None:
            kv_per_token += kv_bytes_per_token(draft_head.config, kv_dtype)
        for extra in [m for m in member_models if isinstance(m, nn.Module)] + ([draft_model] if draft_model is not None and not draft_is_member else []):
            kv_per_token += kv_bytes_per_token(extra.config.get_text_config(), kv_dtype,
                                               draft_layers if extra is draft_model else None)
        if config.kv_region_tokens is not None:
            region_blocks = -(-config.kv_region_tokens // config.block_size)
            num_blocks = config.max_num_seqs * region_blocks
            self.block_manager = RegionBlockManager(config.max_num_seqs, region_blocks, config.block_size)
        else:
            num_blocks = config.num_kv_blocks or self._num_blocks_for_budget(kv_per_token)
            self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(model, self.block_manager, num_blocks, kv_dtype, config.fast_cpu_linear,
                                  packed_cpu_weights=config.packed_cpu_weights,
                                  capture_layers=draft_head.aux_layer_ids if draft_head is not None else None)
        # Fusion members: a runner (own paged KV pool) per model member; n-gram members need no cache.
        self.members = [m if isinstance(m, NgramLM) else
                        ModelRunner(m, self.block_manager, num_blocks, kv_dtype, config.fast_cpu_linear,
                                    packed_cpu_weights=config.packed_cpu_weights)
                        for m in member_models]
        self.scheduler = Scheduler(config, self.block_manager)
        self.proposer = None
        self.draft_policy = None
        self._draft_runs_as_member = draft_is_member
        if speculative is not None:
            if speculative.method == "prompt_lookup":
                self.proposer = PromptLookupProposer(speculative.max_ngram_size, speculative.min_ngram_size)
            elif speculative.method == "ngram":
                self.proposer = NgramProposer(companions.checked_ngram(speculative.ngram_model, self.vocab_size))
            elif speculative.method == "eagle3":
                self.proposer = Eagle3Proposer(HeadRunner(draft_head, self.block_manager, num_blocks, kv_dtype,
                                                          config.fast_cpu_linear,
                                                          packed_cpu_weights=config.packed_cpu_weights), draft_head)
            else:
                if draft_is_member:  # the small fusion member drafts from its own cache
                    draft_runner = next(r for r, m in zip(self.members, member_models) if m is draft_model)
                else:
                    draft_runner = ModelRunner(draft_model, self.block_manager, num_blocks, kv_dtype,
                                               config.fast_cpu_linear, num_layers=draft_layers,
                                               packed_cpu_weights=config.packed_cpu_weights)
                self.proposer = ModelDraftProposer(draft_runner, speculative.draft_confidence,
                                                   keep_unconfident=speculative.deferral_threshold is None)
            self.draft_policy = DraftLengthPolicy(speculative.num_draft_tokens, speculative.adaptive,
                                                  padded_tokens=self.runner.padded_rows)
            self.scheduler.release_hooks += [self.proposer.release, self.draft_policy.release]
            # A proposer that cannot start on any cached prefix (it needs states of positions it has not seen)
            # says how much of one it can reuse.
            self.scheduler.max_reusable_prefix = getattr(self.proposer, "max_reusable_prefix", None)
        # A draft model with a cache of its own rolls it back after verification (a drafting member's advances with
        # the target's).
        self._draft_rolls_back = isinstance(self.proposer, ModelDraftProposer) and not draft_is_member
        self._seq_ids = itertools.count()
        self._drafting_seconds = 0.0  # the proposer's time in the current step (not part of the step's measured cost)
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its samples

    def _num_blocks_for_budget(self, kv_per_token: int) -> int:
        per_block = kv_per_token * self.config.block_size
        budget = self.config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
        # Never more than every sequence at full length needs.
        wanted = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        num_blocks = min(budget // per_block, wanted)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget} is smaller than one KV block ({per_block} bytes)")
        return int(num_blocks)

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int] | None, params: SamplingParams | None = None,
                    processor_prompt: list[int] | None = None, prompt_embeds: torch.Tensor | None = None) -> None:
        """Queue a request (``params.n`` samples of the prompt, each output with its ``index``). Raises ValueError
        (naming the problem) for a request the engine cannot serve; the engine and the other requests are
        unaffected.

        ``processor_prompt``: the prompt as logits processors and stopping criteria see it, where it differs from
        what the model sees (``generate()``: HF's ``input_ids`` row, with its left padding and masked tokens).
        ``prompt_embeds`` ``[k, hidden_size]``: the model's input at the first k prompt positions instead of those
        tokens' embeddings (HF's ``inputs_embeds``, a soft prompt). With ``prompt_token_ids=None`` the prompt is
        these k embeddings alone: processors then see no prompt (as in HF) and ``prompt_token_ids`` of the output
        holds placeholders (0)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_embeds is not None:
            prompt_embeds = self._check_prompt_embeds(prompt_embeds, prompt_token_ids)
        if prompt_token_ids is None:
            if prompt_embeds is None:
                raise ValueError("a request needs prompt_token_ids, prompt_embeds or both")
            prompt_token_ids = [0] * prompt_embeds.shape[0]
            processor_prompt = [] if processor_prompt is None else processor_prompt
        prompt = _check_token_ids(prompt_token_ids, self.vocab_size)
        if processor_prompt is not None:
            processor_prompt = _check_token_ids(processor_prompt, self.vocab_size, allow_empty=True)
        if params.fusion is not None:
            if self.fusion is None:
                raise ValueError("this request has a fusion spec, but the engine has no fusion group (fusion=...)")
            if params.fusion.num_members != self.fusion.spec.num_members:
                raise ValueError(f"the request's fusion spec combines {params.fusion.num_members} models; the engine's "
                                 f"group has {self.fusion.spec.num_members}")
        bad_ids = sorted({t for t in params.token_ids_used() if not 0 <= t < self.vocab_size})
        if bad_ids:
            raise ValueError(f"token id(s) {bad_ids} in the sampling parameters (stop tokens, biases or bad words) are "
                             f"outside the vocabulary [0, {self.vocab_size})")
        deferring = self.speculative is not None and self.speculative.deferral_threshold is not None
        if deferring and (params.logprobs is not None or params.output_scores or params.stopping_criteria):
            raise ValueError("logprobs, output_scores and stopping_criteria are not available with confidence "
                             "deferral (deferred tokens are not scored by the target)")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
                f"context of {self.max_model_len} tokens")
        blocks = self.block_manager.num_blocks_for(total)
        if blocks > self.block_manager.max_blocks_per_seq:
            limit = ("a sequence's region holds only" if self.config.kv_region_tokens is not None
                     else "the cache has only")
            remedy = "kv_region_tokens" if self.config.kv_region_tokens is not None else "kv_cache_memory_bytes"
            raise ValueError(
                f"request {request_id!r} needs {blocks} KV blocks at full length; {limit} "
                f"{self.block_manager.max_blocks_per_seq} (raise {remedy} or lower max_tokens)")
        samples = [Sequence(next(self._seq_ids), request_id, prompt, params.for_sample(i), self.eos_token_ids,
                            processor_prompt, prompt_embeds, index=i)
                   for i in range(params.n)]
        self._requests[request_id] = samples
        for seq in samples:  # the first computes the prompt; the others wait for it and start on its cached blocks
            seq.max_num_tokens = min(seq.num_prompt_tokens + params.max_tokens, self.max_model_len)
            self.scheduler.add(seq)

    def _check_prompt_embeds(self, prompt_embeds, prompt_token_ids) -> torch.Tensor:
        """``prompt_embeds`` on the model's device and dtype, or ValueError naming what is wrong with them."""
        hidden_size = self.model.get_input_embeddings().weight.shape[1]
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 2 \
                or prompt_embeds.shape[1] != hidden_size or not prompt_embeds.is_floating_point():
            shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds)
            raise ValueError(f"prompt_embeds must be a float tensor [num_tokens, {hidden_size}] (the model's hidden "
                             f"size), got {shape}")
        num_rows = prompt_embeds.shape[0]
        if num_rows == 0 or (prompt_token_ids is not None and num_rows > len(prompt_token_ids)):
            raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} rows; give 1 to len(prompt_token_ids) rows")
        if self.fusion is not None:
            raise ValueError("prompt_embeds cannot be used with fusion: the members cannot read the target's "
                             "embeddings")
        if prompt_token_ids is None and self.speculative is not None and self.speculative.method == "draft":
            raise ValueError("a draft model cannot read a prompt given only as embeddings (give the prompt's token "
                             "ids too, or use prompt lookup or self-speculation)")
        weight = self.model.get_input_embeddings().weight
        return prompt_embeds.detach().to(device=weight.device, dtype=weight.dtype)

    def abort(self, request_id: str) -> None:
        """Stop a request (all its samples) and free its KV blocks at once (unknown or finished ids are ignored)."""
        for seq in self._requests.pop(request_id, ()):
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    # ---- the loop ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return the requests that got new tokens (finished ones included; requests
        with ``final_only`` only when they finish)."""
        draft_lengths = None
        if self._plain_decoding():
            draft_lengths = self._draft_lengths()
            if not any(draft_lengths.values()):
                outputs = self._decode_step(time.perf_counter())
                if outputs is not None:
                    return outputs
        draft_lengths = self._draft_lengths() if draft_lengths is None else draft_lengths
        step_start, self._drafting_seconds = time.perf_counter(), 0.0
        scheduled = self.scheduler.schedule(draft_lengths)
        if not scheduled:
            return []
        # Each sequence's new tokens; those whose last token this step feeds emit tokens (their verify windows).
        items, windows = [], []
        for s in scheduled:
            seq = s.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
            emits = end == len(seq.token_ids)
            embeds = None if seq.prompt_embeds is None else seq.prompt_embeds_for(start, s.num_new_tokens)
            items.append(ForwardItem(seq.seq_id, seq.token_ids[start:end], start, 1 if emits else 0, embeds))
            if emits:
                windows.append(s)
        drafts = self._propose(windows)
        if any(d.token_ids for d in drafts):  # the drafts are fed after the window's last token
            draft_of = {s.seq.seq_id: d.token_ids for s, d in zip(windows, drafts) if d.token_ids}
            for item in items:
                draft = draft_of.get(item.seq_id)
                if draft:
                    item.token_ids += draft
                    item.num_logits += len(draft)
        start = time.perf_counter()
        logits = self.runner.forward(items)
        if self.members:
            logits = self._fuse(items, windows, drafts, logits)
        num_tokens, seconds = sum(len(it.token_ids) for it in items), time.perf_counter() - start
        self.scheduler.observe_step(num_tokens, seconds)
        verified = self._verify([s.seq for s in windows], drafts, logits) if windows else None
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            s.seq.stats.num_steps += 1
        outputs = self._accept(windows, drafts, verified, logits) if windows else []
        if isinstance(self.proposer, Eagle3Proposer):
            self._hand_over_target_states(scheduled, items)
        block_size = self.block_manager.block_size
        for s, item in zip(scheduled, items):
            seq = s.seq
            if seq.status is SequenceStatus.FINISHED:  # (finished ones offered theirs when released)
                continue
            if seq.num_computed_tokens // block_size > item.start_pos // block_size:  # a block filled up
                self.scheduler.cache_computed(seq)  # rejected drafts are truncated by now: accepted tokens only
            if self._draft_runs_as_member:  # the drafting member ran over every token of the step with the target
                self.proposer.mark_cached(seq.seq_id, seq.num_computed_tokens)
        if self.draft_policy is not None:
            self.draft_policy.observe_step(num_tokens, time.perf_counter() - step_start - self._drafting_seconds,
                                           sum(len(d.token_ids) for d in drafts))
        return outputs

    def _plain_decoding(self) -> bool:
        """Whether this step can be plain decoding: every running sequence decodes one token, without fusion,
        anything waiting, or per-token reports, and the proposer (if any) needs nothing from a step without drafts
        (then ``_decode_step`` runs it, without per-sequence objects, if no sequence gets drafts)."""
        if self.members or self.scheduler.waiting or not (self.proposer is None or self.proposer.keeps_no_state):
            return False
        running = self.scheduler.running
        return (0 < len(running) <= self.config.max_num_batched_tokens
                and all(len(s.token_ids) - s.num_computed_tokens == 1 and s.reports_tokens_only for s in running))

    def _decode_step(self, step_start: float) -> list[RequestOutput] | None:
        """``step`` for plain decoding, from lists: at large batches the general step's objects per sequence
        (scheduled entries, forward items, windows, drafts) cost more than the forward of a small model. None (and
        nothing done) when a sequence needs a KV block the pool lacks: the general step preempts."""
        seqs = list(self.scheduler.running)
        seq_ids = [s.seq_id for s in seqs]
        positions = [s.num_computed_tokens for s in seqs]
        if not self.block_manager.try_grow_each(seq_ids, [p + 1 for p in positions]):
            return None
        start = time.perf_counter()
        logits = self.runner.forward_decode(seq_ids, [s.token_ids[-1] for s in seqs], positions)
        self.scheduler.observe_step(len(seqs), time.perf_counter() - start)
        if self.draft_policy is not None:  # (a step without drafts: each sequence's wait for its next probe grows)
            for seq_id in seq_ids:
                self.draft_policy.record(seq_id, 0, 0)
        tokens, errors = self._decode_tokens(seqs, logits)
        block_size, cache_computed = self.block_manager.block_size, self.scheduler.cache_computed
        caching = self.block_manager.enable_prefix_caching
        outputs = []
        for seq, token, error in zip(seqs, tokens, errors):
            seq.num_computed_tokens += 1
            seq.stats.num_steps += 1
            if error is not None:
                seq.error = error
                outputs.append(self._finish(seq, "error"))
                continue
            # ``_append`` of one token, without what cannot apply here (stopping criteria; the first token's time,
            # which the step that computed the last prompt token recorded).
            token_ids = seq.token_ids
            token_ids.append(token)
            if token in seq.stop_ids:
                outputs.append(self._finish(seq, "stop"))
            elif len(token_ids) >= seq.max_num_tokens:
                outputs.append(self._finish(seq, "length"))
            else:
                if not seq.params.final_only:
                    outputs.append(seq.to_output())
                if caching and seq.num_computed_tokens % block_size == 0:
                    cache_computed(seq)  # a block filled up (finished ones offered theirs when released)
        if self.draft_policy is not None:
            self.draft_policy.observe_step(len(seqs), time.perf_counter() - step_start)
        return outputs

    def _decode_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list, list[str | None]]:
        """Each sequence's token from its row of a plain decoding step's logits, and its error (None if none; then
        its token is None)."""
        if all(s.is_plain_greedy for s in seqs):
            tokens = greedy_tokens(logits)
            if tokens is not None:
                return tokens, [None] * len(seqs)
        verified = self._verify(seqs, [_NO_DRAFT] * len(seqs), logits)
        return [t[0] if t else None for t in verified.tokens], verified.errors

    def _hand_over_target_states(self, scheduled: list[ScheduledSeq], items: list[ForwardItem]) -> None:
        """Give the draft head the target's aux hidden states of the positions each sequence keeps (its new tokens
        and accepted drafts; rejected drafts are dropped)."""
        rows, seq_ids, starts, counts = [], [], [], []
        offset = 0
        for s, item in zip(scheduled, items):
            count = s.seq.num_computed_tokens - item.start_pos
            if s.seq.status is not SequenceStatus.FINISHED and count > 0:
                rows.append(torch.arange(offset, offset + count))
                seq_ids.append(s.seq.seq_id)
                starts.append(item.start_pos)
                counts.append(count)
            offset += len(item.token_ids)
        if rows:
            index = torch.cat(rows).to(self.runner.aux_hidden_states.device)
            self.proposer.add_target_states(seq_ids, starts, self.runner.aux_hidden_states.index_select(0, index),
                                            counts)

    def _draft_lengths(self) -> dict[int, int]:
        if self.draft_policy is None:
            return {}
        decoding = [s.seq_id for s in self.scheduler.running if s.num_tokens - s.num_computed_tokens == 1]
        prefill = sum(s.num_tokens - s.num_computed_tokens for s in self.scheduler.running) - len(decoding)
        return self.draft_policy.choose(decoding, prefill)

    def _propose(self, windows: list[ScheduledSeq]) -> list[Draft]:
        """Drafts for each emitting sequence (empty without speculation or where k = 0)."""
        if self.proposer is None or not any(s.num_draft_tokens for s in windows):
            return [_NO_DRAFT] * len(windows)
        start = time.perf_counter()
        # Self-speculation's draft is the target's first layers: it reads prompts given as embeddings too.
        reads_embeds = self.speculative.method == "self_spec"
        # Only windows that get drafts ask (every proposer drafts nothing for k = 0; at large batches most get none).
        drafting = [s for s in windows if s.num_draft_tokens]
        requests = [DraftRequest(s.seq.seq_id, s.seq.token_ids, s.num_draft_tokens, s.seq.params, s.seq.seed,
                                 s.seq.num_output_tokens, s.seq.is_coupled, s.seq.row_context(),
                                 s.seq.prompt_embeds if reads_embeds else None)
                    for s in drafting]
        proposed = self.proposer.propose(requests)
        # A draft never runs past the request's token limit or the context.
        for s, d in zip(drafting, proposed):
            room = min(s.seq.params.max_tokens - s.seq.num_output_tokens, self.max_model_len - s.seq.num_tokens) - 1
            if len(d.token_ids) > max(room, 0):
                d.token_ids = d.token_ids[: max(room, 0)]
                d.probs = None if d.probs is None else d.probs[: len(d.token_ids)]
        self._drafting_seconds = time.perf_counter() - start
        self.draft_policy.costs.observe_drafting(sum(len(d.token_ids) for d in proposed), self._drafting_seconds)
        next_proposed = iter(proposed)
        return [next(next_proposed) if s.num_draft_tokens else _NO_DRAFT for s in windows]

    def _fuse(self, items: list[ForwardItem], windows: list[ScheduledSeq], drafts: list[Draft],
              target_logits: torch.Tensor) -> torch.Tensor:
        """Every member advances on this step's tokens; the window rows get the fused log-probabilities."""
        member_logits = []
        for member in self.members:
            if isinstance(member, NgramLM):
                contexts = [s.seq.token_ids + d.token_ids[:j] for s, d in zip(windows, drafts)
                            for j in range(len(d.token_ids) + 1)]
                member_logits.append(member.next_token_logprobs(contexts).to(target_logits.device))
            else:
                member_logits.append(member.forward(items))
        specs = [s.seq.params.fusion or self.fusion.spec for s, d in zip(windows, drafts) for _ in range(len(d.token_ids) + 1)]
        if not specs:
            return target_logits
        return fuse_logits_rows([target_logits] + member_logits, specs)

    def _verify(self, seqs: list[Sequence], drafts: list[Draft], logits: torch.Tensor) -> Verified:
        deferring = self.speculative is not None and self.speculative.deferral_threshold is not None
        if not deferring and all(s.is_plain_greedy for s in seqs):  # (no per-window state to build)
            return verify_plain_greedy(logits, [d.token_ids for d in drafts])
        windows = [Window(d.token_ids, s.params, s.seed, s.num_output_tokens, d.probs, s.row_context())
                   for s, d in zip(seqs, drafts)]
        if deferring:
            return defer(logits, windows, self.speculative.deferral_rollback)
        want_scores = any(s.logprobs is not None or s.scores is not None or s.params.stopping_criteria for s in seqs)
        return verify(logits, windows, want_scores)

    def _accept(self, windows: list[ScheduledSeq], drafts: list[Draft], verified: Verified,
                logits: torch.Tensor) -> list[RequestOutput]:
        """Per window: keep the accepted drafts' cache entries, roll back the rest, then append the emitted tokens.
        Returns the outputs to report."""
        truncate = self.block_manager.truncate
        rollback = self.proposer.rollback if self._draft_rolls_back else None
        policy = self.draft_policy
        outputs = []
        for index, (s, draft) in enumerate(zip(windows, drafts)):
            seq, tokens = s.seq, verified.tokens[index]
            num_drafted, num_accepted = len(draft.token_ids), max(len(tokens) - 1, 0)
            seq.num_computed_tokens += num_accepted
            truncate(seq.seq_id, seq.num_computed_tokens)  # also returns blocks of unused draft room
            if num_drafted and tokens:
                stats = seq.stats
                stats.num_drafted_tokens += num_drafted
                stats.num_accepted_tokens += num_accepted
                if len(stats.acceptance_histogram) <= num_drafted:
                    stats.acceptance_histogram += [0] * (num_drafted + 1 - len(stats.acceptance_histogram))
                stats.acceptance_histogram[num_accepted] += 1
            if rollback is not None:
                rollback(seq.seq_id, seq.num_computed_tokens)
            if policy is not None:
                policy.record(seq.seq_id, num_drafted, num_accepted)
            if verified.errors[index] is not None:
                seq.error = verified.errors[index]
                outputs.append(self._finish(seq, "error"))
                continue
            scores = None
            if verified.scores is not None or seq.logits is not None:
                rows = range(verified.row_starts[index], verified.row_starts[index] + len(tokens))
                scores = [verified.scores[r] for r in rows] if verified.scores is not None else None
                if seq.logprobs is not None:
                    seq.logprobs += _logprobs(torch.stack(scores), tokens, seq.params.logprobs)
                if seq.scores is not None:
                    seq.scores += [row.float() for row in scores]
                if seq.logits is not None:
                    # (copies: a row view would keep the whole step's logits alive, and be an inference tensor)
                    seq.logits += [logits[r].float().clone() for r in rows]
            output = self._append(seq, tokens, scores)
            if output is not None:
                outputs.append(output)
        return outputs

    def _append(self, seq: Sequence, tokens: list[int], scores: list[torch.Tensor] | None = None) -> RequestOutput | None:
        """Append new tokens, cutting at a stop token, a stopping criterion, max_tokens or the context; finish the
        sequence if done."""
        if seq.stats.first_token_time is None:
            seq.stats.first_token_time = time.perf_counter()
        token_ids, stop_ids, criteria = seq.token_ids, seq.stop_ids, seq.params.stopping_criteria
        for i, token in enumerate(tokens):
            token_ids.append(token)
            if token in stop_ids:  # min_tokens is enforced by masking stop tokens before sampling
                return self._finish(seq, "stop")
            if criteria and self._criteria_met(seq, None if scores is None else scores[i]):
                return self._finish(seq, "stop")
            if len(token_ids) >= seq.max_num_tokens:  # max_tokens or the context
                return self._finish(seq, "length")
        return None if seq.params.final_only else seq.to_output()

    @staticmethod
    def _criteria_met(seq: Sequence, scores: torch.Tensor | None) -> bool:
        input_ids = torch.tensor([seq.processor_token_ids()], dtype=torch.int64)
        scores = None if scores is None else scores[None]
        return any(bool(torch.as_tensor(criterion(input_ids, scores)).any()) for criterion in seq.params.stopping_criteria)

    def _finish(self, seq: Sequence, reason: str) -> RequestOutput:
        """End ``seq`` with ``reason``; per-token reports of tokens cut off after the end are dropped."""
        for report in (seq.logprobs, seq.scores, seq.logits):
            if report is not None and len(report) > seq.num_output_tokens:
                del report[seq.num_output_tokens:]
        seq.finish_reason = reason
        seq.stats.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        if all(s.is_finished for s in self._requests.get(seq.request_id, ())):
            self._requests.pop(seq.request_id, None)
        return seq.to_output()


def _logprobs(scores: torch.Tensor, tokens: list[int], num_top: int) -> list[TokenLogprob]:
    """``scores``: [len(tokens), vocab_size], the logits each token was chosen from."""
    logprobs = torch.log_softmax(scores.double(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    if num_top:
        top_values, top_ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops)]


def _check_token_ids(token_ids, vocab_size: int, allow_empty: bool = False) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, str) or not hasattr(token_ids, "__len__"):
        raise TypeError(f"prompt_token_ids must be a list of ints, got {type(token_ids).__name__}")
    if len(token_ids) == 0 and not allow_empty:
        raise ValueError("the prompt is empty: give at least one token")
    ids = list(token_ids)
    if not set(map(type, ids)) <= {int}:  # (the common case of plain ints skips the per-token checks)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"prompt_token_ids must hold ints, found {t!r}")
            ids[i] = int(t)
    if ids and not (0 <= min(ids) and max(ids) < vocab_size):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def _eos_token_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
