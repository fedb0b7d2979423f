"""LoRA adapters per job: the files (``files``: named in LORAS_DIR or downloaded, cached, checked)
and applying them to a family's models for one job, exactly undone after it (``apply``)."""
