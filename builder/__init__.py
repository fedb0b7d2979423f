"""What the image build runs: the weight builder (download_models.py) and the pinned requirements."""
