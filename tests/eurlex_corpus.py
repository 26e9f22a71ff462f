"""A generated EURLEX57K-like corpus in both layouts (jsonl.gz and per-document folders), for tests.

Each document's text names its labels' topic words (learnable), split into header / recitals /
main_body paragraphs / attachments; the jsonl text is those parts joined by newlines, as the
shipped jsonl was made. Label ids are EuroVoc-like numeric strings; a few occur only in test.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

TOPICS = [f"topic{i}" for i in range(24)]
CONCEPTS = [str(100 + 7 * i) for i in range(len(TOPICS))]  # numeric ids, not in string order ("100" < "23")
TEST_ONLY = {CONCEPTS[-1], CONCEPTS[-2]}


def make_docs(n: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """{split: [original-layout documents]}; labels 1-3 concepts, frequent ones more often."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, len(TOPICS) + 1).double()
    docs: dict[str, list[dict]] = {}
    for split, count in n.items():
        out = []
        for i in range(count):
            k = int(torch.randint(1, 4, (1,), generator=gen))
            picks = torch.multinomial(weights, k, replacement=False, generator=gen).tolist()
            if split != "test":
                picks = [p for p in picks if CONCEPTS[p] not in TEST_ONLY] or [0]
            elif i % 4 == 0:  # every test-only label occurs in test
                picks = [p for p in picks if CONCEPTS[p] not in TEST_ONLY] + [len(TOPICS) - 1 - (i // 4) % 2]
            words = [TOPICS[p] for p in picks]
            celex = f"3{split[0]}{i:05d}"
            out.append({"celex_id": celex, "uri": f"http://x/{celex}", "type": "Regulation",
                        "title": f"Regulation {celex} on {words[0]}",
                        "header": f"Regulation {celex} on {words[0]}",
                        "recitals": "" if i % 5 == 0 else f"Whereas {' and '.join(words)} matter",
                        "main_body": [f"Article {j}: on {w}" for j, w in enumerate(words, 1)] + ([""] if i % 7 == 0 else []),
                        "attachments": "" if i % 3 else f"Annex on {words[-1]}",
                        "concepts": [CONCEPTS[p] for p in picks]})
        docs[split] = out
    return docs


def joined_text(doc: dict) -> str:
    parts = [doc["header"], doc["recitals"], *doc["main_body"], doc["attachments"]]
    return "\n".join(p for p in parts if p)


def write_descriptors(folder: Path, extra: int = 3) -> None:
    """labels.json with every concept (+ a few that no document uses)."""
    ids = CONCEPTS + [str(9000 + i) for i in range(extra)]
    obj = {c: {"concept_id": c, "label": f"name of {c}", "alt_labels": [], "parents": []} for c in ids}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(obj))


def write_jsonl(folder: Path, docs: dict[str, list[dict]]) -> Path:
    write_descriptors(folder)
    for split, rows in docs.items():
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in rows:
                f.write(json.dumps({"celex_id": d["celex_id"], "type": d["type"], "title": d["title"],
                                    "text": joined_text(d), "labels": d["concepts"]}) + "\n")
    return folder


def write_folders(folder: Path, docs: dict[str, list[dict]]) -> Path:
    write_descriptors(folder)
    for split, rows in docs.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for d in rows:
            (folder / split / f"{d['celex_id']}.json").write_text(json.dumps(d))
    return folder
