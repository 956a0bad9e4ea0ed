"""Evaluation: pass@1 / maj@k / pass@k on verifiable problems, and the report card."""
