"""Evaluation: pass@1 / maj@k on verifiable problems, and the report card."""
