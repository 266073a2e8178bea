"""The two tokenizer formats Ember reads, behind one small interface.

`SentencePieceBackend` wraps a `tokenizer.model`; `HFTokenizersBackend` wraps a Hugging Face
`tokenizer.json` through the `tokenizers` library. Both encode text without BOS/EOS (the
`Tokenizer` front end adds those) and both treat added tokens (special or not) the way
transformers does: a token's text found in the input becomes that token's id.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine.errors import CheckpointError, InvalidRequestError


@dataclass(frozen=True)
class AddedToken:
    """A token declared outside the base vocabulary model (tokenizer_config's `added_tokens_decoder`)."""

    id: int
    content: str
    special: bool = True


class _Backend:
    """What `Tokenizer` needs from a format: ids without BOS/EOS in, text out."""

    vocab_size: int
    special_ids: frozenset[int]
    # Byte-fallback ids whose text depends on the whole run of adjacent byte ids (see HFTokenizersBackend).
    grouped_byte_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def _checked_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise InvalidRequestError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id

    def _known_ids(self, ids: Sequence[int]) -> list[int]:
        # A model's embedding often has more rows than the tokenizer has tokens (padded to a
        # multiple of 64 or 128); a sampled padding id has no text, as in transformers.
        ids = [int(i) for i in ids]
        if ids and min(ids) < 0:
            raise InvalidRequestError(f"token id {min(ids)} is negative")
        if ids and max(ids) >= self.vocab_size:
            ids = [i for i in ids if i < self.vocab_size]
        return ids


def _split_pattern(contents: Iterable[str]) -> re.Pattern | None:
    # Longest first, so "<|im_end|>" wins over a shorter token that is its prefix.
    ordered = sorted(set(c for c in contents if c), key=len, reverse=True)
    if not ordered:
        return None
    return re.compile("(" + "|".join(re.escape(c) for c in ordered) + ")")


class SentencePieceBackend(_Backend):
    """A SentencePiece `tokenizer.model`, plus any tokens tokenizer_config.json adds on top.

    Text is split on added/control tokens first and each piece of plain text is encoded by
    SentencePiece. With `legacy=False` (transformers' default) only text at the very start of the
    input gets SentencePiece's dummy-prefix space; text after a special token does not.
    """

    def __init__(self, path: str | Path, added: Sequence[AddedToken] = (), legacy: bool = False):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: not a readable SentencePiece model ({exc})") from exc
        self._legacy = legacy
        self._proto = self._sp.serialized_model_proto()
        self._add_dummy_prefix = _normalizer_flag(self._proto, "add_dummy_prefix", default=True)
        self._sp_plain = None  # built on first use: the same model without the dummy prefix
        self._base = base = self._sp.get_piece_size()

        # Tokens decoded as their literal text rather than through SentencePiece: control and
        # unknown pieces (which SentencePiece decodes to "" / " ⁇ ") and everything added on top.
        self._literal: dict[int, str] = {
            i: self._sp.id_to_piece(i) for i in range(base) if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        special = set(self._literal)
        for tok in added:
            self._literal[tok.id] = tok.content
            if tok.special:
                special.add(tok.id)
        self.special_ids = frozenset(special)
        self._by_content = {content: i for i, content in self._literal.items()}
        self._pattern = _split_pattern(self._by_content)
        self.vocab_size = max([base] + [t.id + 1 for t in added])

    def encode(self, text: str) -> list[int]:
        if self._pattern is None:
            return self._sp.encode(text)
        ids: list[int] = []
        offset = 0
        for part in self._pattern.split(text):
            if not part:
                continue
            if part in self._by_content:
                ids.append(self._by_content[part])
            elif offset == 0 or self._legacy:
                ids.extend(self._sp.encode(part))
            else:
                ids.extend(self._plain_sp().encode(part))
            offset += len(part)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Ids between the model's pieces and the added tokens (if any gap) have no text either.
        ids = [i for i in self._known_ids(ids) if i < self._base or i in self._literal]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._literal:
                self._flush(run, out)
                out.append(self._literal[i])
            else:
                run.append(i)
        self._flush(run, out)
        return "".join(out)

    def _flush(self, run: list[int], out: list[str]) -> None:
        if not run:
            return
        text = self._sp.decode(run)
        # SentencePiece drops the word-boundary space of the first piece it decodes; that is only
        # right at the start of the whole text, not after a special token (transformers keeps it).
        if out and self._add_dummy_prefix and self._sp.id_to_piece(run[0]).startswith("\u2581"):
            text = " " + text
        out.append(text)
        run.clear()

    def id_to_piece(self, token_id: int) -> str:
        token_id = self._checked_id(token_id)
        if token_id in self._literal:
            return self._literal[token_id]
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        if piece in self._by_content:
            return self._by_content[piece]
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def model_special_pieces(self) -> dict[str, str]:
        """The pieces the model itself marks as unk/bos/eos/pad (absent when disabled)."""
        ids = {"unk": self._sp.unk_id(), "bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        return {name: self._sp.id_to_piece(i) for name, i in ids.items() if i >= 0}

    def _plain_sp(self):
        if self._sp_plain is None:
            if not self._add_dummy_prefix:
                self._sp_plain = self._sp
            else:
                import sentencepiece as spm

                proto = _with_normalizer_flag(self._proto, "add_dummy_prefix", False)
                self._sp_plain = spm.SentencePieceProcessor(model_proto=proto)
        return self._sp_plain


def _model_proto(serialized: bytes):
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    return proto


def _normalizer_flag(serialized: bytes, name: str, default: bool) -> bool:
    spec = _model_proto(serialized).normalizer_spec
    return bool(getattr(spec, name)) if spec.HasField(name) else default


def _with_normalizer_flag(serialized: bytes, name: str, value: bool) -> bytes:
    proto = _model_proto(serialized)
    setattr(proto.normalizer_spec, name, value)
    return proto.SerializeToString()


def _uses_decoder(spec: Any, name: str) -> bool:
    if isinstance(spec, dict):
        return spec.get("type") == name or any(_uses_decoder(v, name) for v in spec.values())
    if isinstance(spec, list):
        return any(_uses_decoder(v, name) for v in spec)
    return False


class HFTokenizersBackend(_Backend):
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: str | Path, added: Sequence[AddedToken] = ()):
        import tokenizers

        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises a bare Exception on malformed JSON
            raise CheckpointError(f"{self.path}: not a readable tokenizer.json ({exc})") from exc
        # tokenizer_config.json may declare tokens tokenizer.json lacks; transformers adds them.
        missing = [t for t in added if self._tok.token_to_id(t.content) is None]
        if missing:
            self._tok.add_special_tokens([tokenizers.AddedToken(t.content, special=True) for t in missing if t.special])
            self._tok.add_tokens([tokenizers.AddedToken(t.content, special=False) for t in missing if not t.special])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        # The ByteFallback decoder turns a run of byte tokens into text all at once, and into one
        # U+FFFD per byte if the run is not valid UTF-8: a stray byte can undo characters before it.
        decoder = self._tok.decoder
        if decoder is not None and _uses_decoder(json.loads(decoder.__getstate__()), "ByteFallback"):
            byte_ids = (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
            self.grouped_byte_ids = frozenset(i for i in byte_ids if i is not None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(self._known_ids(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(self._checked_id(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def adds_bos(self, bos_id: int | None) -> bool:
        """Whether tokenizer.json's own post-processor puts `bos_id` in front of a sequence."""
        if bos_id is None:
            return False
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos_id
