"""The data side of pretraining: corpora, the SentencePiece tokenizer, token shards, packed datasets."""
