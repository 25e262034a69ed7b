"""A tiny randomly initialised Llama with a character-level tokenizer, written to disk.

Tests need a real model that vLLM serves in seconds and that nobody downloads. Two
layers and a 100-odd-symbol vocabulary keep an engine start short. The output layer is
scaled up so that next-token distributions are peaked and vary with the prefix, which is
what the log-prob and sampling-statistics tests need to tell distributions apart.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EOS = "<|endoftext|>"
SPECIAL = [EOS, "<|user|>", "<|assistant|>", "<|system|>"]
# Model defaults that vLLM's server applies to unscheduled requests: scheduled ones must not inherit them.
GENERATION_CONFIG = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


def write_tiny_llama(path: Path, *, tie_word_embeddings: bool = False, seed: int = 0, logit_scale: float = 4.0) -> Path:
    """Write config, safetensors weights, tokenizer and generation config into ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=None, eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS], torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale / config.initializer_range / 128**0.5)
    model.save_pretrained(path, safe_serialization=True)
    gen = {"eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS], "do_sample": True, **GENERATION_CONFIG}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return path
