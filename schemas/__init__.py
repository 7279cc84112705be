"""The wire contract: pydantic models are the source, JSON Schema files under schemas/json are exported from them."""

from schemas._base import SCHEMA_VERSION
from schemas.batch import BadLine, BatchJob
from schemas.cost import CostRecord
from schemas.health import ModelHealth
from schemas.quality import EvalSuite, Sample, ScoreRecord, SuiteFile
from schemas.policy import CachePolicy, GuardrailPolicy, ModelPrice, ModelSpec, PolicySet, ProviderSpec, RoutePolicy, TenantLimits
from schemas.request import ChatMessage, InferenceRequest, Priority, Sampling, new_request_id, now_ms
from schemas.result import CacheHit, ErrorInfo, InferenceResult, Latency, Status, StreamDelta
from schemas.routed import ConfidenceCheck, DeadLetter, Hop, Memo, RoutedRequest

# Each of these is exported as schemas/json/<Name>.schema.json for producers in other languages.
EXPORTED = (InferenceRequest, InferenceResult, CostRecord, RoutePolicy, PolicySet, RoutedRequest, DeadLetter,
            ModelHealth, StreamDelta, ConfidenceCheck, BatchJob, EvalSuite, SuiteFile, Sample, ScoreRecord)

__all__ = [
    "SCHEMA_VERSION",
    "EXPORTED",
    "BadLine",
    "BatchJob",
    "CacheHit",
    "CachePolicy",
    "GuardrailPolicy",
    "ConfidenceCheck",
    "ChatMessage",
    "CostRecord",
    "DeadLetter",
    "ErrorInfo",
    "EvalSuite",
    "Hop",
    "InferenceRequest",
    "InferenceResult",
    "Latency",
    "Memo",
    "ModelHealth",
    "ModelPrice",
    "ModelSpec",
    "PolicySet",
    "ProviderSpec",
    "Priority",
    "RoutePolicy",
    "RoutedRequest",
    "Sample",
    "Sampling",
    "ScoreRecord",
    "Status",
    "StreamDelta",
    "SuiteFile",
    "TenantLimits",
    "new_request_id",
    "now_ms",
]
