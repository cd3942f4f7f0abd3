"""Intake: sources -> bytes -> decoded RGB images plus basic metadata."""
