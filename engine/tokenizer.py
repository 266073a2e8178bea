"""The tokenizer of a checkpoint directory: encode, decode, special tokens and the chat template.

`Tokenizer.from_dir` reads the Hugging Face layout: `tokenizer.json` (preferred, as transformers
prefers its fast tokenizers) or `tokenizer.model` (SentencePiece), with `tokenizer_config.json`,
`special_tokens_map.json`, `chat_template.jinja` and `generation_config.json` when present.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.chat_template import ChatTemplate
from engine.errors import CheckpointError, InvalidRequestError
from engine.tokenizer_backends import AddedToken, HFTokenizersBackend, SentencePieceBackend, _Backend

logger = logging.getLogger(__name__)

# The named special tokens transformers hands to chat templates (as `bos_token`, `eos_token`, ...).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers writes this for "no limit".
_NO_LIMIT = 10**12


class Tokenizer:
    """One interface over SentencePiece and Hugging Face tokenizers.

    Build it with `Tokenizer.from_dir(checkpoint_dir)`. Ids never include BOS/EOS unless asked
    (`encode(add_bos=...)`); `decode` skips special tokens by default.
    """

    def __init__(
        self,
        backend: _Backend,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool = True,
        extra_eos_ids: Sequence[int] = (),
        chat_template: str | None = None,
        model_max_length: int | None = None,
        source: str = "tokenizer",
    ):
        self._backend = backend
        self.special_tokens_map: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.add_bos_token = add_bos_token
        self.model_max_length = model_max_length
        self.source = source
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.pad_id = self._special_id("pad_token")
        self.unk_id = self._special_id("unk_token")
        eos = {i for i in extra_eos_ids if 0 <= i < backend.vocab_size}
        if self.eos_id is not None:
            eos.add(self.eos_id)
        self.eos_ids: frozenset[int] = frozenset(eos)
        self.chat_template = chat_template
        self._compiled: ChatTemplate | None = ChatTemplate(chat_template, source) if chat_template else None

    # ---- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer files of a checkpoint directory."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        added = _added_tokens(config, path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            backend: _Backend = HFTokenizersBackend(path / "tokenizer.json", added)
            defaults: dict[str, str] = {}
        elif (path / "tokenizer.model").is_file():
            backend = SentencePieceBackend(path / "tokenizer.model", added, legacy=bool(config.get("legacy", False)))
            defaults = _sentencepiece_defaults(backend)
        else:
            raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model in the directory")

        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            if name in config:
                value = config[name]
            elif name in special_map:
                value = special_map[name]
            else:
                value = defaults.get(name)
            if isinstance(value, Mapping):  # the serialized AddedToken form
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value

        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        elif isinstance(backend, HFTokenizersBackend):
            add_bos = backend.adds_bos(backend.piece_to_id(special.get("bos_token", "")))
        else:
            add_bos = "bos_token" in special
        max_len = config.get("model_max_length")
        return cls(
            backend,
            special_tokens=special,
            add_bos_token=add_bos,
            extra_eos_ids=_generation_eos_ids(path / "generation_config.json"),
            chat_template=_chat_template(path, config),
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < _NO_LIMIT else None,
            source=str(path),
        )

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        if token is None:
            return None
        token_id = self._backend.piece_to_id(token)
        if token_id is None:
            logger.warning("%s: %s %r is not in the vocabulary; ignoring it", self.source, name, token)
            del self.special_tokens_map[name]
        return token_id

    # ---- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.vocab_size

    def __len__(self) -> int:
        return self._backend.vocab_size

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids that `decode(skip_special_tokens=True)` drops."""
        return self._backend.special_ids

    @property
    def grouped_byte_ids(self) -> frozenset[int]:
        """Byte-fallback ids whose text is only final once a non-byte token follows (tokenizer.json's
        ByteFallback decoder decodes a run of them as a whole); empty for SentencePiece."""
        return self._backend.grouped_byte_ids

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (SentencePiece piece or tokenizer.json token)."""
        return self._backend.id_to_piece(token_id)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary entries of several ids, as transformers names it."""
        return [self._backend.id_to_piece(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None when there is none."""
        return self._backend.piece_to_id(token)

    # ---- encode / decode

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the checkpoint (`add_bos_token`).

        Special tokens written in the text (such as "<|im_start|>") become their ids.
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, got {type(text).__name__}")
        return self._wrap(self._backend.encode(text), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None, add_eos: bool = False) -> list[list[int]]:
        """`encode` over many texts (parallel for tokenizer.json)."""
        return [self._wrap(ids, add_bos, add_eos) for ids in self._backend.encode_batch(list(texts))]

    def _wrap(self, ids: list[int], add_bos: bool | None, add_eos: bool) -> list[int]:
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Incomplete UTF-8 at the end shows as U+FFFD; ids past the vocabulary
        (padding rows of a larger embedding) have no text."""
        return self._backend.decode(ids, skip_special_tokens)

    # ---- chat

    @property
    def has_chat_template(self) -> bool:
        return self._compiled is not None

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render a conversation to prompt text, the same text as transformers' `apply_chat_template(tokenize=False)`.

        `variables` reach the template as is (`tools=[...]`, `enable_thinking=False`, ...); the
        special tokens (`bos_token`, `eos_token`, ...) are set unless given.
        """
        if self._compiled is None:
            raise InvalidRequestError(
                "this model has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja); "
                "use the completions endpoint with a plain prompt instead",
                param="messages",
            )
        return self._compiled.render(messages, add_generation_prompt, **{**self.special_tokens_map, **variables})

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> list[int]:
        """Token ids of a rendered conversation. No BOS is added: the template writes it when the model wants one."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **variables), add_bos=False)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _added_tokens(config: Mapping, where: Path) -> list[AddedToken]:
    tokens = []
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        try:
            tokens.append(AddedToken(int(key), str(entry["content"]), bool(entry.get("special", False))))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: bad added_tokens_decoder entry {key!r}") from exc
    return tokens


def _sentencepiece_defaults(backend: SentencePieceBackend) -> dict[str, str]:
    # When tokenizer_config.json does not name them, the model's own unk/bos/eos pieces are the
    # special tokens (LlamaTokenizer's "<unk>", "<s>", "</s>" for Llama models).
    pieces = backend.model_special_pieces()
    return {f"{name}_token": pieces[name] for name in ("unk", "bos", "eos") if name in pieces}


def _generation_eos_ids(path: Path) -> list[int]:
    value = _read_json(path).get("eos_token_id")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _chat_template(path: Path, config: Mapping) -> str | None:
    # Newer transformers save the template beside the config; it then wins over the config's copy.
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = _read_json(path / "chat_template.json")
    template = json_file.get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None
