"""Runs an EAGLE-3 draft head over its own paged KV pool (one layer), sharing the sequences' block tables.

The head's decoder layer is transformers' Llama attention with wider projections, so it runs through the same
hooks as any model: ``PagedCache.update`` writes its K/V into the pool and the registered paged attention reads them
back. Each token comes with an input state (the target's states mixed by fc, or the head's previous output).
"""

from __future__ import annotations

import torch

from cospec.engine import attention
from cospec.engine.model_runner import ModelRunner


class HeadRunner(ModelRunner):
    def forward(self, items, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft-vocabulary logits, output states) ``[sum(num_logits), ...]`` for ``states`` ``[num_tokens, H]``."""
        with torch.inference_mode():
            inputs, meta = self.input_batch.prepare(items)
            self.cache.start_step(meta.slot_mapping)
            with (self._cospec_mode(len(inputs.input_ids), len(inputs.logit_rows)),
                  attention.step_context(meta, self.pool)):
                out = self.model(inputs.input_ids[None], inputs.positions[None], states[None].to(self.pool.k[0].dtype),
                                 cache=self.cache)[0]
                out = out.index_select(0, inputs.logit_rows)  # [num_logits, H]
                return self.model.compute_logits(out), out
