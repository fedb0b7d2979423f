"""Wan 2.1 video family: T2V and VACE pipelines and tiny test models."""
