"""A byte-level BPE tokenizer trained locally with Hugging Face ``tokenizers``.

Saved as a ``GPT2TokenizerFast`` (``tokenizer_class: GPT2Tokenizer`` in its config), so
llm-foundry and ``AutoTokenizer`` load it by path: ``tokenizer: {name: <dir>}``. GPT-2
conventions: one special token ``<|endoftext|>`` that is eos, bos and unk; no pad token
(llm-foundry pads with eos); no special tokens added on encode; it returns ``input_ids`` and
``attention_mask`` only, so ``model.generate(**tok(text, return_tensors='pt'))`` works on an
exported causal LM (a ``token_type_ids`` entry would be refused by ``generate``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ['EOS_TOKEN', 'MIN_VOCAB_SIZE', 'MODEL_INPUT_NAMES', 'train_tokenizer']

EOS_TOKEN = '<|endoftext|>'
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1 + 1  # the bytes, <|endoftext|>, at least one merge
MODEL_INPUT_NAMES = ['input_ids', 'attention_mask']  # what a causal LM's forward and generate take


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: Path,
    model_max_length: int = 2048,
):
    """Train a byte-level BPE of ``vocab_size`` entries on ``texts`` and save it to ``output_dir``.

    Returns the ``GPT2TokenizerFast``. Training is deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.gpt2.tokenization_gpt2_fast import GPT2TokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f'vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}.')

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)

    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=model_max_length,
        model_input_names=list(MODEL_INPUT_NAMES),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer
