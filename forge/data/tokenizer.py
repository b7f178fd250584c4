"""Tokenizers: character level, byte-level BPE trained here, or any Hugging Face tokenizer.

Every tokenizer is stored as a Hugging Face `tokenizer.json` (plus `tokenizer_config.json`
naming the special tokens), so the file written beside the shards is the one the trainer, the
converters and `transformers.AutoTokenizer` all read. The character tokenizer is stored as a
BPE model with no merges, no pre-tokenizer and a `Fuse` decoder (one token per character);
`Tokenizer.load` recognises that shape and returns a `CharTokenizer`, which refuses characters
outside its alphabet instead of dropping them.

Special tokens of tokenizers built here: end-of-document `<|endoftext|>`, BOS `<|bos|>`,
pad `<|pad|>`. A BPE tokenizer puts them first (ids 0, 1, 2); a character tokenizer puts them
after the alphabet, so the characters keep ids 0..len(alphabet)-1.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

import numpy as np

from forge.fsutil import JSONFileError, atomic_file, read_json_object

EOD, BOS, PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"
SPECIALS = (EOD, BOS, PAD)
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# names of the special tokens in common tokenizers, when no tokenizer_config.json says
_EOD_NAMES = (EOD, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_PAD_NAMES = (PAD, "<pad>", "<|padding|>", "[PAD]")


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`: encode/decode, special ids, save/load."""

    def __init__(self, backend, eod: str, bos: Optional[str] = None, pad: Optional[str] = None):
        self.backend = backend
        self.eod_token, self.bos_token, self.pad_token = eod, bos, pad
        self.eod_id = self._id(eod)
        self.bos_id = self._id(bos) if bos else None
        self.pad_id = self._id(pad) if pad else None

    def _id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self.backend.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def special_tokens(self) -> dict:
        return {"eos_token": self.eod_token, "bos_token": self.bos_token, "pad_token": self.pad_token}

    def save(self, directory: str) -> str:
        """Write tokenizer.json and tokenizer_config.json into `directory` (write-then-rename)."""
        os.makedirs(directory, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens()}
        for name, text in ((CONFIG_FILE, json.dumps(config, indent=1)), (TOKENIZER_FILE, self.to_json())):
            with atomic_file(os.path.join(directory, name), encoding="utf-8") as f:
                f.write(text)
        return os.path.join(directory, TOKENIZER_FILE)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """From a tokenizer.json file or a folder holding one (or any folder transformers reads)."""
        if os.path.isdir(path):
            folder, file = path, os.path.join(path, TOKENIZER_FILE)
        else:
            folder, file = os.path.dirname(path) or ".", path
        config = {}
        for name in ("special_tokens_map.json", CONFIG_FILE):         # the latter wins
            if os.path.exists(os.path.join(folder, name)):
                config.update({k: v for k, v in _read_json_object(os.path.join(folder, name)).items()
                               if v is not None})
        if os.path.exists(file):
            backend = _read_backend(file)
        elif os.path.isdir(path):
            backend = _backend_via_transformers(path)
        else:
            raise FileNotFoundError(f"no tokenizer at {path!r} (expected a tokenizer.json or a folder)")
        return cls.from_backend(backend, config, source=path)

    @staticmethod
    def from_json(text: str, config: dict) -> "Tokenizer":
        """From tokenizer.json text and a {eos_token, bos_token, pad_token} mapping."""
        from tokenizers import Tokenizer as Backend
        return Tokenizer.from_backend(Backend.from_str(text), config, source="<json>")

    @staticmethod
    def from_backend(backend, config: dict, source: str) -> "Tokenizer":
        """A CharTokenizer for the char shape (see module doc), else a Tokenizer; special tokens
        from `config` (tokenizer_config.json) or, failing that, by their usual names."""
        vocab = backend.get_vocab(with_added_tokens=True)
        pick = lambda key, names: _token_name(config.get(key)) or next((n for n in names if n in vocab), None)
        eod, bos, pad = pick("eos_token", _EOD_NAMES), pick("bos_token", _BOS_NAMES), pick("pad_token", _PAD_NAMES)
        if eod is None:
            raise ValueError(f"tokenizer {source!r} has no end-of-document token (looked for eos_token in "
                             f"{CONFIG_FILE} and for {list(_EOD_NAMES)})")
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        if (model.get("type") == "BPE" and not model.get("merges") and spec.get("pre_tokenizer") is None
                and (spec.get("decoder") or {}).get("type") == "Fuse"):
            return CharTokenizer(backend, eod, bos, pad)
        return Tokenizer(backend, eod, bos, pad)


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read or parsed; the message names the file."""


def _read_json_object(file: str) -> dict:
    """The JSON object in `file`, or TokenizerFileError naming it."""
    try:
        return read_json_object(file)
    except (OSError, JSONFileError) as e:
        what = str(e) if isinstance(e, JSONFileError) else f"{file!r} cannot be read ({type(e).__name__}: {e})"
        raise TokenizerFileError(f"tokenizer file {what}; copy it again from its source (or re-run forge prepare)"
                                 ) from None


def _read_backend(file: str):
    """A `tokenizers.Tokenizer` from tokenizer.json `file`, or TokenizerFileError naming it."""
    from tokenizers import Tokenizer as Backend
    try:
        return Backend.from_file(file)
    except Exception as e:          # noqa: BLE001 - tokenizers raises its own Exception for bad JSON
        raise TokenizerFileError(f"tokenizer file {file!r} does not parse as a Hugging Face tokenizer.json "
                                 f"({e}); it is truncated or corrupt: copy it again from its source "
                                 "(or re-run forge prepare)") from None


def check_tokenizer_files(folder: str) -> list[str]:
    """Parse every tokenizer file of `folder` that is present (tokenizer.json and the JSON files
    beside it) before anything is copied or converted; TokenizerFileError names the first bad
    one. Returns the names checked."""
    checked = []
    for name in ("special_tokens_map.json", CONFIG_FILE, "added_tokens.json", "vocab.json"):
        if os.path.isfile(os.path.join(folder, name)):
            _read_json_object(os.path.join(folder, name))
            checked.append(name)
    if os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
        _read_backend(os.path.join(folder, TOKENIZER_FILE))
        checked.append(TOKENIZER_FILE)
    return checked


def _token_name(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def _backend_via_transformers(folder: str):
    """A folder without tokenizer.json (e.g. sentencepiece files): let transformers convert it."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer folder {folder!r} has no fast (tokenizer.json) form")
    return hf.backend_tokenizer


class CharTokenizer(Tokenizer):
    """One token per character of a fixed alphabet (ids 0..n-1 in sorted order), specials after."""

    def __init__(self, backend, eod: str = EOD, bos: Optional[str] = BOS, pad: Optional[str] = PAD):
        super().__init__(backend, eod, bos, pad)
        vocab = backend.get_vocab(with_added_tokens=False)
        chars = sorted(vocab, key=ord)
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._ids = np.array([vocab[c] for c in chars], dtype=np.int64)
        self._itos = {i: c for c, i in backend.get_vocab(with_added_tokens=True).items()}

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        """The alphabet is every character of `texts`."""
        alphabet: set[str] = set()
        for t in texts:
            alphabet.update(t)
        return cls.from_alphabet(alphabet)

    @classmethod
    def from_alphabet(cls, alphabet: Iterable[str]) -> "CharTokenizer":
        from tokenizers import Tokenizer as Backend, decoders, models
        chars = sorted(set(alphabet) - set(SPECIALS), key=ord)
        backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(list(SPECIALS))
        return cls(backend)

    @property
    def alphabet(self) -> str:
        return "".join(map(chr, self._codes))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._codes, codes).clip(0, len(self._codes) - 1)
        bad = self._codes[pos] != codes
        if bad.any():
            missing = sorted({chr(c) for c in codes[bad]})
            raise ValueError(f"the character tokenizer cannot encode {len(missing)} character(s) "
                             f"outside its alphabet: {missing[:20]!r}")
        return self._ids[pos]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._itos[int(i)] for i in ids)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style byte alphabet) with the specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus specials ({256 + len(SPECIALS)})")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, EOD, BOS, PAD)


def resolve_tokenizer(spec: str, texts=None, vocab_size: int = 4096) -> Tokenizer:
    """`char` / `bpe` (trained on the iterable `texts`) or a path to load."""
    if spec == "char":
        return CharTokenizer.train(texts)
    if spec == "bpe":
        return train_bpe(texts, vocab_size)
    return Tokenizer.load(spec)
