"""Everything that touches vLLM internals, so that a vLLM upgrade edits this package alone.

The server is written against vLLM 0.32; the processor runs on 0.24 to 0.34
(docs/compat.md). One job per module:

* :mod:`.compat` -- which processor interfaces the installed vLLM has (feature checks);

* :mod:`.processor` -- the EAD logits processor, accepted by both model runners (V1 and
  Model Runner V2); the ``vllm.logits_processors`` entry point names it here;
* :mod:`.targets` -- in-pass numbers (target log-probs, entropies, temperatures): the
  worker-side store and collecting it;
* :mod:`.entropy_clock` -- each sample's entropy clock, kept across preemption and reloads;
* :mod:`.seeds` -- independent sample streams for seeded ``n > 1`` requests;
* :mod:`.serving` -- ``ead-server serve`` as vLLM's own ``vllm serve`` with our
  endpoint plugin enabled;
* :mod:`.engine` -- the engine calls the routes make (generate, score, reload).
"""

from ead_server.vllm_adapter.processor import EADLogitsProcessor

__all__ = ["EADLogitsProcessor"]
