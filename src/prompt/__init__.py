"""Prompt enhancement: a local instruct LLM rewrites a job's prompt before it is generated."""
