"""Memory: a persistent FAISS vector index over text chunks or images, semantic search and ``ask``."""

from transferkit.memory.chunking import Chunk, Document, chunk_document, read_documents
from transferkit.memory.index import SearchHit, VectorIndex, add_to_index, build_index, embed

__all__ = ["Chunk", "Document", "SearchHit", "VectorIndex", "add_to_index", "build_index", "chunk_document",
           "embed", "read_documents"]
