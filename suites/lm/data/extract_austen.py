"""Rebuild pride_and_prejudice_ch1-8.txt from the Debian package that ships the text offline.

    apt-get download r-cran-janeaustenr            # 1.0.0-1, sha256 df6bddf2...c019c95
    dpkg -x r-cran-janeaustenr_1.0.0-1_all.deb pkg
    python3 suites/lm/data/extract_austen.py pkg/usr/lib/R/site-library/janeaustenr \
        suites/lm/data/pride_and_prejudice_ch1-8.txt

The package (MIT; the novels are in the public domain) keeps each novel as an R character
vector, one element per line of Project Gutenberg's text without its licence header, in
R's lazy-load database ``data/Rdata.rdb`` (index ``Rdata.rdx``): zlib-compressed XDR
serialisations. This reads just enough of that format for a character vector, joins
``prideprejudice``'s lines with newlines up to the line "Chapter 9" and writes the title
and chapters 1-8 (64,812 characters, sha256 e14edf01...b7f92d9f, 16,416 SmolLM2 tokens).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import sys
import zlib
from pathlib import Path


class _XDR:
    """A reader for the few R serialisation types these files use."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialisation")
        self.b, self.i, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            n = self.int()  # the native encoding's name follows
            self.i += n

    def int(self) -> int:
        (v,) = struct.unpack(">i", self.b[self.i:self.i + 4])
        self.i += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE
            return None
        if kind == 255:  # REFSXP: a symbol seen before
            ref = flags >> 8 or self.int()
            return self.refs[ref - 1]
        if kind == 1:  # SYMSXP
            self.refs.append(("sym", self.item()))
            return self.refs[-1]
        if kind == 2:  # LISTSXP (pairlist): [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head, tail = (tag, self.item()), self.item()
            return [head, *(tail or [])]
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8")
            self.i += n
            return s
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            out = list(struct.unpack(f">{n}i", self.b[self.i:self.i + 4 * n]))
            self.i += 4 * n
        elif kind in (16, 19):  # STRSXP, VECSXP
            out = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"R type {kind} not handled")
        if has_attr:
            attrs = dict((t[1], v) for t, v in self.item())
            return {"value": out, **attrs}
        return out


def novel_lines(package_dir: Path, name: str) -> list[str]:
    data = Path(package_dir) / "data"
    index = _XDR(gzip.decompress((data / "Rdata.rdx").read_bytes())).item()
    variables = dict(zip(index["value"][0]["names"], index["value"][0]["value"], strict=True))
    offset, length = variables[name]
    blob = (data / "Rdata.rdb").read_bytes()[offset:offset + length]
    (size,) = struct.unpack(">i", blob[:4])
    raw = zlib.decompress(blob[4:])
    if len(raw) != size:
        raise ValueError(f"{name}: {len(raw)} bytes, the database says {size}")
    return _XDR(raw).item()


def main(package_dir: str, out: str) -> None:
    lines = novel_lines(Path(package_dir), "prideprejudice")
    stop = next(i for i, line in enumerate(lines) if re.fullmatch(r"Chapter 9", line))
    text = "\n".join(lines[:stop]).rstrip("\n") + "\n"
    Path(out).write_text(text, encoding="utf-8")
    print(out, len(text), hashlib.sha256(text.encode()).hexdigest())


if __name__ == "__main__":
    main(*sys.argv[1:3])
