"""RunPod serverless worker for SDXL images and Wan 2.1 videos."""
