"""Data: the challenge's shard format, lossless tokenizers, `prepare`, the embedded corpus, loaders.

`shards` reads and writes `*.bin` token shards; `tokenizer` trains and checks SentencePiece
models; `prepare` turns a text or jsonl file into a directory of shards plus `meta.json`;
`corpus` builds the embedded default corpus at set-up; `loader` serves training batches.
"""
