"""Byte-level BPE (GPT-2 style) from a GGUF file's tokenizer metadata.

SmolLM2's tokenizer (``tokenizer.ggml.model = "gpt2"``, ``pre = "smollm"``): the vocabulary
``tokenizer.ggml.tokens`` (49152 strings in GPT-2's byte-to-unicode alphabet), the merges
``tokenizer.ggml.merges`` (48900 pairs, lowest rank first) and the token types (3 =
control: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...).

Encoding, as Hugging Face's ``tokenizer.json`` for SmolLM2 (and llama.cpp's
``LLAMA_VOCAB_PRE_TYPE_SMOLLM``) define it:
1. control tokens written literally in the text are matched first (``allow_special``);
2. pre-tokenisation: every digit is its own piece (``Digits(individual_digits=True)``),
   then GPT-2's regex splits the rest (contractions, optional space + letters, optional
   space + digits, optional space + other symbols, whitespace runs);
3. each piece's UTF-8 bytes are mapped to GPT-2's printable alphabet and merged pair by
   pair, always the lowest-ranked adjacent pair first.
No BOS is added (``add_bos_token`` is false for this model). Decoding maps the alphabet
back to bytes and decodes UTF-8 (invalid sequences replaced).

Needs the ``regex`` package (Unicode property classes ``\\p{L}``, ``\\p{N}``), which the
``lm`` extra installs.
"""

from __future__ import annotations

from functools import lru_cache

CONTROL = 3  # GGUF token type of control (special) tokens
# Hugging Face ByteLevel(use_regex=True): GPT-2's pattern
GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (``Ġ`` is the space)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class BPETokenizer:
    def __init__(self, tokens: list[str], merges: list[str], token_type: list[int] | None = None,
                 *, pre: str = "smollm", bos_token_id: int = -1, eos_token_id: int = -1):
        import regex

        if pre not in ("smollm", "gpt2", "default", ""):
            raise NotImplementedError(f"pre-tokeniser {pre!r}: this tokenizer knows 'smollm'")
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        if len(self.vocab) != len(self.tokens):
            raise ValueError("the vocabulary has duplicate tokens")
        self.ranks = {}
        for rank, m in enumerate(merges):
            a, b = m.split(" ")
            self.ranks[(a, b)] = rank
        types = token_type or [1] * len(self.tokens)
        self.special = {t: i for i, t in enumerate(self.tokens) if types[i] == CONTROL}
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self._digits = pre == "smollm"
        self._pattern = regex.compile(GPT2_PATTERN)
        self._digit = regex.compile(r"\p{N}")
        self._special_re = (regex.compile("|".join(regex.escape(s) for s in sorted(
            self.special, key=len, reverse=True))) if self.special else None)
        self._byte_enc = bytes_to_unicode()
        self._byte_dec = {c: b for b, c in self._byte_enc.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_metadata(cls, meta: dict) -> BPETokenizer:
        """From ``gguf_weights.read_tokenizer``'s dict (also stored in the weights cache)."""
        return cls(meta["tokens"], meta["merges"], meta.get("token_type"),
                   pre=meta.get("pre", "smollm"), bos_token_id=meta.get("bos_token_id", -1),
                   eos_token_id=meta.get("eos_token_id", -1))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # --- encoding ------------------------------------------------------------------------
    def _pieces(self, text: str) -> list[str]:
        chunks = [text]
        if self._digits:  # each digit isolated, the text between kept whole
            chunks, last = [], 0
            for m in self._digit.finditer(text):
                if m.start() > last:
                    chunks.append(text[last:m.start()])
                chunks.append(m.group())
                last = m.end()
            if last < len(text):
                chunks.append(text[last:])
        return [p for c in chunks for p in self._pattern.findall(c)]

    def _bpe(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        word = [self._byte_enc[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best, best_rank = None, None
            for i in range(len(word) - 1):
                r = self.ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            merged = word[best] + word[best + 1]
            out, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and word[i] == word[best] and word[i + 1] == word[best + 1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        try:
            ids = [self.vocab[w] for w in word]
        except KeyError as e:
            raise ValueError(f"piece {piece!r}: symbol {e.args[0]!r} is not in the vocabulary") \
                from None
        if len(self._cache) < 200_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        last = 0
        if allow_special and self._special_re is not None:
            for m in self._special_re.finditer(text):
                for p in self._pieces(text[last:m.start()]):
                    ids.extend(self._bpe(p))
                ids.append(self.special[m.group()])
                last = m.end()
        for p in self._pieces(text[last:]):
            ids.extend(self._bpe(p))
        return ids

    # --- decoding ------------------------------------------------------------------------
    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            tok = self.tokens[int(i)]
            if tok in self.special:
                out.extend(tok.encode("utf-8"))
            else:
                out.extend(self._byte_dec[c] for c in tok)
        return out.decode("utf-8", errors="replace")
