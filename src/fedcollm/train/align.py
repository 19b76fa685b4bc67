"""Knowledge distillation between models whose tokenizers differ (FedMKT-style, approximated).

Two pieces, both computed once and reused:

- `VocabMap`: each teacher token → one student token: the student token with the same bytes
  (each token read back to the bytes it stands for, so the word-boundary marks "Ġ" and "▁" both
  become a space), else the student token nearest by edit distance on those bytes (MinED). Looked
  up lazily, only for the teacher tokens that KD actually uses, and kept in a JSON file under
  the cache folder keyed by both vocabularies.
- `align`: which tokens of two tokenizations of the same text cover the same characters. Both
  tokenizers report each token's character span; walking the two span lists together and
  closing a group wherever both have a token boundary at the same character (the dynamic
  programme reduces to this linear walk because both tokenize one and the same string) cuts the
  text into groups, each covered by a run of teacher tokens and a run of student tokens. A group
  of one token on each side is a position where the two models predict the same text from the
  same prefix: there the teacher's top-k distribution, carried into the student's vocabulary
  through the map, is the student's KD target.

What is approximated: a teacher token whose text the student has no token for is credited to
the nearest student token by spelling, not meaning; at positions that do not align one to one
the student's KD target is its own label (so KD is plain CE there); and only the teacher's
top-k tokens carry probability mass.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


_SPACE_MARK = "▁".encode()  # SentencePiece's word-boundary mark, a space in the text


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (a printable character for every byte) → the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(printable, printable)), 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + extra
            extra += 1
    return {chr(c): byte for byte, c in chars.items()}


def token_texts(tokenizer) -> list[str]:
    """Each token id's bytes in the text (one character per byte, latin-1), whatever the
    tokenizer's spelling: byte-level tokens ("Ġthe") are mapped back through GPT-2's byte
    alphabet, SentencePiece tokens ("▁the", "<0x0A>") through their marks, so that the same text
    has the same key in both vocabularies and no two byte tokens collide."""
    decoder = repr(tokenizer.backend_tokenizer.decoder) if hasattr(tokenizer, "backend_tokenizer") else ""
    byte_level, table = "ByteLevel" in decoder, _byte_decoder()
    out = []
    for tok in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        tok = tok or ""
        if byte_level and all(c in table for c in tok):
            raw = bytes(table[c] for c in tok)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            raw = bytes([int(tok[3:5], 16)])
        else:
            raw = tok.encode()
        out.append(raw.replace(_SPACE_MARK, b" ").decode("latin-1"))
    return out


def _vocab_key(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


class VocabMap:
    """teacher token id → student token id: same text, else MinED; memoised and kept on disk."""

    def __init__(self, teacher_tok, student_tok, cache_dir: Path | None):
        self.teacher_texts = token_texts(teacher_tok)
        self.student_texts = token_texts(student_tok)
        self.exact = {}
        for sid, text in enumerate(self.student_texts):
            self.exact.setdefault(text, sid)  # the first id of a text, as the student's own encoder would
        name = f"vocab-map-{_vocab_key(self.teacher_texts)}-to-{_vocab_key(self.student_texts)}.json"
        self.path = Path(cache_dir) / name if cache_dir else None
        self.known: dict[int, int] = {}
        if self.path and self.path.is_file():
            self.known = {int(k): v for k, v in json.loads(self.path.read_text()).items()}
        self._added = 0

    def __call__(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """The student ids of a tensor of teacher ids (same shape and device)."""
        flat = teacher_ids.flatten().tolist()
        for tid in set(flat) - self.known.keys():
            self.known[tid] = self._nearest(self.teacher_texts[tid])
            self._added += 1
        return torch.tensor([self.known[t] for t in flat], device=teacher_ids.device).view_as(teacher_ids)

    def _nearest(self, text: str) -> int:
        if text in self.exact:
            return self.exact[text]
        from rapidfuzz import distance, process  # noqa: PLC0415

        _, _, sid = process.extractOne(text, self.student_texts, scorer=distance.Levenshtein.distance)
        return sid

    def save(self) -> None:
        """Write the map so far (atomically), if it grew."""
        if not self.path or not self._added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self.known.items())}))
        os.replace(tmp, self.path)
        self._added = 0


def align(spans_a: list[tuple[int, int]], spans_b: list[tuple[int, int]]) -> list[tuple[range, range]]:
    """Groups (tokens of a, tokens of b) that cover the same characters, in order.

    spans: each token's (start, end) character offsets in one and the same text, both starting
    where the text does. A token of zero width (a special token) joins the group it sits in.
    """
    groups, i, j, start_i, start_j = [], 0, 0, 0, 0
    while i < len(spans_a) or j < len(spans_b):
        end_a = spans_a[i][1] if i < len(spans_a) else float("inf")
        end_b = spans_b[j][1] if j < len(spans_b) else float("inf")
        if end_a <= end_b:
            i += 1
        if end_b <= end_a:
            j += 1
        if end_a == end_b:  # both sides end a token here: a group closes, with every further
            # token that ends here too (the byte tokens of one multi-byte character share its span)
            while i < len(spans_a) and spans_a[i][1] <= end_a:
                i += 1
            while j < len(spans_b) and spans_b[j][1] <= end_b:
                j += 1
            groups.append((range(start_i, i), range(start_j, j)))
            start_i, start_j = i, j
    if start_i < len(spans_a) or start_j < len(spans_b):
        groups.append((range(start_i, len(spans_a)), range(start_j, len(spans_b))))
    return groups


def one_to_one(groups: list[tuple[range, range]]) -> list[tuple[int, int]]:
    """The (a, b) token pairs of the groups that hold exactly one token on each side."""
    return [(ga[0], gb[0]) for ga, gb in groups if len(ga) == 1 and len(gb) == 1]


def within_shared_text(spans_a: list[tuple[int, int]], text_a: str, spans_b: list[tuple[int, int]],
                       text_b: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The two span lists cut where the texts part: each keeps its first tokens, up to the last
    character where both texts are still the same and both have a token boundary (so that `align`
    ends on a closed group). Two chat templates render the same answer and then each its own
    end-of-turn marks: KD pairs tokens by the characters they cover, which only the same text can
    do, so the marks are learnt from each model's own labels only."""
    same = len(os.path.commonprefix([text_a, text_b]))
    ends = {e for _, e in spans_a if e <= same} & {e for _, e in spans_b if e <= same}
    cut = max(ends, default=0)

    def upto(spans):  # the leading tokens that end by the cut (rows stay the same indices)
        return spans[:next((i for i, (_, e) in enumerate(spans) if e > cut), len(spans))]

    return upto(spans_a), upto(spans_b)
