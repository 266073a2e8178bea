"""Small tokenizer checkpoints built offline for the tokenizer tests.

- `sentencepiece_dir`: the project's own trained SentencePiece BPE (tokenizer.model, ChatML template).
- `converted_dir`: that model converted by transformers to a tokenizer.json (Metaspace + ByteFallback).
- `byte_level_dir`: a byte-level BPE tokenizer.json trained here with the `tokenizers` library, with
  Llama-3 style special tokens, a Llama-3 style chat template and a generation_config.json that
  lists an extra end token.
"""
from __future__ import annotations

import json
from pathlib import Path

from training.tokenizer_train import TINY_CORPUS, train_tiny_tokenizer

# A Llama-3 style template written out with the whitespace control real templates use, so
# trim_blocks / lstrip_blocks matter to the result.
LLAMA3_STYLE_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] | trim %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system_text = "" %}
    {%- set rest = messages %}
{%- endif %}
{%- if system_text %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_text + '<|eot_id|>' }}
{%- endif %}
{%- for message in rest %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Exercises the rest of the environment: plain (non "-") blocks that trim_blocks/lstrip_blocks
# reshape, namespace(), loop controls, tojson with non-ASCII and indent, the generation block
# and template variables such as `tools`.
FEATURES_TEMPLATE = """{% set ns = namespace(count=0) %}
{% if tools %}
Tools:
{% for tool in tools %}
{{ tool | tojson(indent=2) }}
{% endfor %}
{% endif %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    [{{ ns.count }}] {{ message.role | upper }}:
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content }}{% endgeneration %}{{ eos_token }}
    {% else %}
{{ message.content }}
    {% endif %}
    {% if ns.count >= 5 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
    [{{ ns.count + 1 }}] ASSISTANT:
{% endif %}
"""

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def corpus_lines() -> list[str]:
    return [line for line in TINY_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_sentencepiece_dir(path: Path) -> Path:
    return train_tiny_tokenizer(path, vocab_size=512)


def build_byte_level_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": LLAMA3_STYLE_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos_ids = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos_ids}))
    return path


def build_converted_dir(sentencepiece_dir: Path, path: Path) -> Path:
    """The SentencePiece model as transformers converts it: a tokenizer.json with Metaspace and
    ByteFallback decoding (the layout of most published Llama and Mistral checkpoints)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(sentencepiece_dir).save_pretrained(path)
    assert (path / "tokenizer.json").is_file()
    return path
