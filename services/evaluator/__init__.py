"""The evaluator: scores sampled answers against their eval suites and watches quality for drift."""
