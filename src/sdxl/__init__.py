"""The SDXL family: job rules (``plan``), pipelines (``family``), fast paths, tiny models."""

TEXT_TOKENS = 77  # CLIP's context length: SDXL tokenizes every prompt chunk to 77 ids
