"""crossrank: fast, native cross-encoder reranking for RAG pipelines."""

from crossrank.engine import Reranker
from crossrank.result import RerankResult

__all__ = ["RerankResult", "Reranker"]
__version__ = "0.1.0"
