"""Scoring answers: the metrics (strict, paper, LLaVA-Med), their statistics, prediction files."""
