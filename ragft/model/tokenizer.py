"""The tiny model's tokenizer: byte-level BPE trained on the sample corpus, cached by content hash.

Real models bring their own tokenizer (`AutoTokenizer.from_pretrained`); the tiny
model has none, so ragft trains one once and saves it as an ordinary HF tokenizer
folder that `AutoTokenizer.from_pretrained` loads without ragft.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ragft.jsonl import BadRowError, jsonl_rows

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Each turn is "<|role|>\n {content}<|end|>\n"; the assistant's "<|end|>" is trained on, so the
# model learns to stop. The template is prefix-stable (rendering n turns is a prefix of n+1),
# which is what the loss mask relies on. The space before the content makes a reply's first word
# the same tokens as that word in running text: without it "1504" is 1|50|4 but " 1504" in a
# retrieved chunk is Ġ150|4, and a name's first piece differs (Z vs ĠZ), so a value could not be
# copied token for token from the context. Replies are generated with that space; serve strips it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n ' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def corpus_texts(paths: Iterable[str | os.PathLike]) -> Iterable[str]:
    """Every string a JSONL file holds (document text, messages, prompts, answers); a line that is not JSON
    raises BadRowError naming it."""
    for path in paths:
        for _, row in jsonl_rows(path):
            if isinstance(row, BadRowError):
                raise row
            yield from _strings(row)


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def cached_tokenizer(corpus_paths: list[str], vocab_size: int, cache_dir: str | os.PathLike) -> Path:
    """Folder of a tokenizer trained on `corpus_paths`; trained once per (corpus, vocab size)."""
    digest = hashlib.sha256(f"bpe-v1|{vocab_size}|{CHAT_TEMPLATE}".encode())
    for path in sorted(corpus_paths):
        digest.update(Path(path).read_bytes())
    folder = Path(cache_dir) / "tokenizers" / digest.hexdigest()[:16]
    if (folder / "tokenizer.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    train_tokenizer(corpus_texts(sorted(corpus_paths)), vocab_size).save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
