"""A small byte-level BPE tokenizer trained at test time (no hub), for tiny models that must read text."""

from __future__ import annotations

from functools import lru_cache

from transformers import PreTrainedTokenizerFast

TOKENIZER_VOCAB = 384  # 256 byte symbols + merges + specials; tiny models are built with this vocab


@lru_cache(maxsize=1)
def _training_text() -> tuple[str, ...]:
    from sparseprefill.evals.logits import reference_text

    text = reference_text()
    return tuple(text[i : i + 2000] for i in range(0, 200_000, 2000))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
