"""A byte-level BPE tokenizer trained on the training split, saved as a Hugging Face tokenizer with a chat template.

Byte-level: every byte has a token, so any text encodes (no <unk> in practice) and decodes back exactly.
Special tokens <unk>=0, <s>=1 (put before every encoded text), </s>=2; make_model's tokenizers come from
train_bpe too.
"""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2

# The model was trained on plays only, so a chat is rendered as a scene: each message is a speech under its
# speaker's name ("User." / "Assistant.", the corpus's "Name." heading on a line of its own), a system message
# a stage direction in brackets. The reply is the next speech: it ends at the first blank line, where the
# model starts another speaker's heading (it never learnt to emit </s>).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[{{ message['content'] | trim }}]\n\n"
    "{% elif message['role'] == 'user' %}User.\n{{ message['content'] | trim }}\n\n"
    "{% else %}Assistant.\n{{ message['content'] | trim }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant.\n{% endif %}"
)


def train_tokenizer(lines: list[str], vocab_size: int) -> Any:
    """BPE merges learnt from `lines` (deterministic for the same lines and size), with the chat template;
    a PreTrainedTokenizerFast."""
    # Lines keep their newline: line breaks carry the verse and the speaker headings, so they get tokens too.
    return train_bpe(lines, vocab_size, chat_template=CHAT_TEMPLATE)


def train_bpe(lines: list[str], vocab_size: int, **fast_kwargs: Any) -> Any:
    """A byte-level BPE learnt from `lines` with SPECIAL_TOKENS first (<unk>=0, <s>=1, </s>=2) and <s> put before
    every text; a PreTrainedTokenizerFast (`fast_kwargs` go to it: a chat_template). Also make_model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("</s>") == EOS_ID
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=1 << 30, **fast_kwargs,
    )
