"""Web-scale pre-training data: streaming readers, C4/Gopher cleaning, deduplication.

    from tinylm.webdata import read_documents, iter_corpus, ReadStats
    for doc in read_documents("c4-train.00000-of-01024.json.gz"):   # streamed
        doc.text, doc.meta["url"], doc.id                             # 'c4-...gz:17'

Modules, top-down: ``readers`` (files -> ``Document`` streams, bad records counted),
``wikitext`` (the stated subset of MediaWiki markup removed), ``hashing`` (stable,
vectorised 64-bit hashes of words, sentences and shingles), ``hashset`` (a compact
uint64 set), ``external`` (corpus-wide key state in hash-partitioned files, bounded
memory), ``langid`` (the language-ID plugin point), ``filters`` / ``clean_passes`` /
``clean`` (``tinylm data clean``), ``minhash`` / ``dedup_index`` / ``dedup`` (``tinylm
data dedup``), ``shards``
(the per-shard, resumable output every stage shares: ``plan``, ``finished``,
``mark_finished``, ``jsonl_writer``, ``progress``). ``tinylm/data.py`` is the trainer's token data; this package prepares text.
"""

from tinylm.webdata.readers import (  # noqa: F401
    FORMATS,
    Document,
    ReadStats,
    WebDataError,
    c4_shard_info,
    detect_format,
    expand_inputs,
    iter_corpus,
    open_binary,
    read_documents,
)
