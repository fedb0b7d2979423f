"""SDXL image family: plan, pipelines and tiny test models."""
