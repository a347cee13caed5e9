"""End-to-end retrieve-then-rerank pipeline used by ``crossrank demo``, ``crossrank eval`` and
the RAG examples: dense retrieval of the top 50 from FAISS, crossrank reranking to the top 5,
then an LLM prompt citing those 5 passages by id.

Needs the ``rag`` extra (``pip install crossrank[rag]``): faiss-cpu, sentence-transformers,
ir-measures and httpx are imported only by the modules that use them.
"""
