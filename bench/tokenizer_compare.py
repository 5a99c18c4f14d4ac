#!/usr/bin/env python3
"""Times Hugging Face's GPT-2 tokenizers on the text bench_tokenizer.cpp encodes, for
bench/RESULTS_tokenizer.md:

  * HF `tokenizers` (Rust): tokenizers.Tokenizer with a BPE model from encoder.json / vocab.bpe and
    the ByteLevel pre-tokenizer (what GPT2TokenizerFast runs), one call on the whole text;
  * transformers' GPT2TokenizerFast (the same Rust code behind the transformers API);
  * transformers' slow, pure-Python GPT2Tokenizer (OpenAI's encoder.py algorithm), when the
    installed transformers still has it (< 5; e.g. a venv with transformers==4.46.3).

The text: the first 10,000,000 bytes (cut back to a UTF-8 boundary) of the four-domain train.jsonl
records, finance, medicine, stackoverflow, leetcode, each as instruction \\n input \\n output \\n\\n.

Usage: python3 bench/tokenizer_compare.py [--shared ../shared] [--save-ids /tmp/hf_ids.bin]
--save-ids writes the Rust tokenizer's ids as int32 for MOA_BENCH_COMPARE_IDS in bench_tokenizer.
"""
import argparse
import json
import os
import struct
import time


def bench_text(shared):
    parts = []
    for d in ["finance", "medicine", "stackoverflow", "leetcode"]:
        with open(os.path.join(shared, "data", "four-domain", d, "train.jsonl"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                parts.append(r["instruction"] + "\n" + r["input"] + "\n" + r["output"] + "\n\n")
    b = "".join(parts).encode("utf-8")
    n = min(len(b), 10_000_000)
    while 0 < n < len(b) and (b[n] & 0xC0) == 0x80:
        n -= 1
    return b[:n].decode("utf-8")


def timed(name, fn, text, repeat):
    best, best_cpu, ids = None, None, None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        ids = fn(text)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        best = dt if best is None else min(best, dt)
        best_cpu = dc if best_cpu is None else min(best_cpu, dc)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"{name:52s} wall {best:7.2f} s ({mb / best:6.2f} MB/s)  cpu {best_cpu:7.2f} s ({mb / best_cpu:6.2f} MB/s)"
          f"  {len(ids)} tokens")
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("MOA_SHARED_DIR", "../shared"))
    ap.add_argument("--save-ids")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    text = bench_text(args.shared)
    d = os.path.join(args.shared, "models", "gpt2-tokenizer")
    enc, merges = os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe")
    print(f"text: {len(text.encode('utf-8'))} bytes, {len(text)} code points")

    import tokenizers
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tok = Tokenizer(models.BPE.from_file(enc, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rust_ids = timed(f"tokenizers {tokenizers.__version__} (Rust), 1 thread call", lambda t: tok.encode(t).ids, text,
                     args.repeat)
    docs = [d + "\n\n" for d in text.split("\n\n")]
    docs[-1] = docs[-1][:-2]
    timed("tokenizers (Rust), encode_batch of records", lambda t: [i for e in tok.encode_batch(docs) for i in e.ids],
          text, args.repeat)
    if args.save_ids:
        with open(args.save_ids, "wb") as f:
            f.write(struct.pack(f"<{len(rust_ids)}i", *rust_ids))

    import transformers
    fast_cls = getattr(transformers, "GPT2TokenizerFast", None)
    if fast_cls is not None:
        fast = fast_cls(enc, merges)
        ids = timed(f"transformers {transformers.__version__} GPT2TokenizerFast", lambda t: fast.encode(t), text, args.repeat)
        assert ids == rust_ids
    slow_cls = getattr(transformers, "GPT2Tokenizer", None)
    if slow_cls is not None and "Fast" not in slow_cls.__name__ and not hasattr(slow_cls, "_tokenizer"):
        slow = slow_cls(enc, merges)
        if not getattr(slow, "is_fast", False):
            ids = timed(f"transformers {transformers.__version__} GPT2Tokenizer (slow, Python)", lambda t: slow.encode(t),
                        text, 1)
            assert ids == rust_ids, "slow and fast tokenizers disagree"
            return
    print(f"transformers {transformers.__version__} has no slow GPT2Tokenizer (needs transformers < 5)")


if __name__ == "__main__":
    main()
