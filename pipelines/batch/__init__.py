"""Batch scoring: the flow ``batch_predict`` (:mod:`pipelines.batch.flow`), the model version it scores
with (:mod:`pipelines.batch.model`) and the dataset's rows as that version takes them
(:mod:`pipelines.batch.inputs`). docs/batch-scoring.md says what a run does."""

from pipelines.batch.flow import (
    BATCH_ROLE,
    CHUNK_ROWS,
    Batch,
    BatchConfig,
    Chunk,
    batch_predict,
    batch_predict_flow,
    inject_fault,
)

__all__ = ["BATCH_ROLE", "CHUNK_ROWS", "Batch", "BatchConfig", "Chunk", "batch_predict", "batch_predict_flow",
           "inject_fault"]
