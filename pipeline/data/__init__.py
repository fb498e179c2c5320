"""Data: the challenge's shard format, tokenizers, `prepare`, downloads, audits, the embedded corpus, loaders.

`shards` reads and writes `*.bin` token shards and byte sidecars; `tokenizer` loads and checks
SentencePiece models (and trains pgolf's lossless one), `tokenizer_train` trains with the
challenge's or pgolf's settings, `tiktoken_tokenizer` / `tiktoken_file` adapt tiktoken encodings;
`prepare` turns a text or jsonl file into a directory of shards plus `meta.json` (the challenge's
exact export with `challenge=True`); `identity` checks a directory against its meta.json and the
published validation counts; `download` fetches a published export through huggingface_hub;
`audit` finds validation documents that also occur in training; `corpus` builds the embedded
default corpus at set-up; `loader` and `coprime_loader` serve training batches.
"""
