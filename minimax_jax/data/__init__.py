"""Training data. Import from the submodules (kept out of this file so ``byte_tokenizer`` stays light):

- ``pipeline``: ``DataConfig``, ``make_dataset``, ``state_to_json`` / ``state_from_json``.
- ``tokenizer``: ``load_tokenizer``, ``HFTokenizer``, ``document_token_ids``; ``byte_tokenizer``: ``ByteTokenizer``.
- ``sources``: ``read_documents``; ``corpus``: ``builtin_corpus_documents``; ``packing``: ``PackedIterDataset``.
"""
