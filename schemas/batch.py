"""BatchJob: what a batch job says about itself on the batches topic, for `batch status` anywhere."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas._base import NAME_PATTERN, Message, WireModel

MAX_BAD_LINES_KEPT = 1000  # a file of a million bad lines still makes a small record


class BadLine(WireModel):
    line: int = Field(ge=1, description="1-based line number in the input file.")
    custom_id: str | None = None
    error: str


class BatchJob(Message):
    id: str = Field(pattern=NAME_PATTERN, description="batch_<hash of the file, route and tenant>: the same job resumes.")
    tenant: str = Field(pattern=NAME_PATTERN)
    route: str = Field(pattern=NAME_PATTERN)
    file: str = Field(max_length=4096, description="The input file's name where it was submitted.")
    file_sha256: str
    lines: int = Field(ge=0, description="Lines in the file (blank ones not counted).")
    good: int = Field(ge=0, description="Lines that became requests.")
    bad: int = Field(ge=0)
    bad_lines: list[BadLine] = Field(default_factory=list, max_length=MAX_BAD_LINES_KEPT)
    published: int = Field(default=0, ge=0, description="Requests published so far (a resumed run counts again).")
    answered: int = Field(default=0, ge=0, description="Requests with a final result, as the submitter last saw.")
    state: Literal["running", "stopped", "done"] = "running"
    created_ms: int = Field(ge=0, description="When the job was first submitted: its requests' created_at_ms.")
    updated_ms: int = Field(ge=0)
    host: str = Field(default="", max_length=256, description="Where the submitter last ran.")
    output: str = Field(default="", max_length=4096, description="Where that submitter writes the results.")
